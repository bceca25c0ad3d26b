-- lock.lua: take a lock, or extend it when this owner already holds it (a long job renews it).
-- KEYS 1 the lock   payload: owner, ttl_ms
-- Returns 1 when the owner holds the lock now, 0 when another does
if redis.call('SET', KEYS[1], p.owner, 'PX', p.ttl_ms, 'NX') then return 1 end
if redis.call('GET', KEYS[1]) == p.owner then
  redis.call('PEXPIRE', KEYS[1], p.ttl_ms)
  return 1
end
return 0
