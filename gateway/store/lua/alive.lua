-- alive.lua: a process says it is alive (heartbeat), or asks which processes are.
-- KEYS  the processes' liveness keys   payload: ttl_ms (a heartbeat for KEYS[1]) or nothing
-- Returns, for each key, 1 if that process is alive
if p.ttl_ms then redis.call('SET', KEYS[1], '1', 'PX', p.ttl_ms) end
local out = {}
for i = 1, #KEYS do out[i] = redis.call('EXISTS', KEYS[i]) end
return out
