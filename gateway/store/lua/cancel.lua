-- cancel.lua: undo an admit whose answer never came back (the store timed out), whenever that
-- admit runs: the tombstone makes an admit still queued behind this script change nothing.
-- KEYS  1 tombstone   2 reservations hash   3 budget hash   4 flight lock   5 idempotency hash
-- payload: ticket, rid (the reservation, if any), tomb_ms
redis.call('SET', KEYS[1], '1', 'PX', p.tomb_ms)
if p.rid then
  local period, amount, key = take_reservation(KEYS[2], p.rid)
  if period then unreserve(KEYS[3], period, amount, key) end
end
if redis.call('GET', KEYS[4]) == p.ticket then redis.call('DEL', KEYS[4]) end
if redis.call('HGET', KEYS[5], 'owner') == p.ticket then redis.call('DEL', KEYS[5]) end
return 1
