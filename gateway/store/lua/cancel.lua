-- cancel.lua: undo an admit whose answer never came back (the store timed out), whenever that
-- admit runs: the tombstone makes an admit still queued behind this script change nothing.
-- KEYS  1 tombstone   2 reservations hash   3 budget hash   4 flight lock   5 idempotency hash
-- ARGV  1 ticket      2 reservation id ('' = none)          3 tombstone ttl ms
redis.call('SET', KEYS[1], '1', 'PX', ARGV[3])
if ARGV[2] ~= '' then
  local period, amount = take_reservation(KEYS[2], ARGV[2])
  if period and amount > 0 then redis.call('HINCRBY', KEYS[3], 'reserved:' .. period, -amount) end
end
if redis.call('GET', KEYS[4]) == ARGV[1] then redis.call('DEL', KEYS[4]) end
if redis.call('HGET', KEYS[5], 'owner') == ARGV[1] then redis.call('DEL', KEYS[5]) end
return 1
