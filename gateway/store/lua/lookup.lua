-- lookup.lua: an organisation-scoped cache entry, or its flight lock (Redis Cluster keeps these
-- in their own hash slot, apart from the team's keys; see cluster.py).
-- KEYS 1 cache entry   2 flight lock   payload: ticket, hold_ms
-- Returns {0 lock taken | 1 hit | 2 someone else holds the lock, entry or false, entry ttl ms}
local entry = redis.call('GET', KEYS[1])
if entry then return {1, entry, redis.call('PTTL', KEYS[1])} end
if redis.call('SET', KEYS[2], p.ticket, 'NX', 'PX', p.hold_ms) then return {0, false, 0} end
return {2, false, 0}
