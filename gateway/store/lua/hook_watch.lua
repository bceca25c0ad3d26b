-- hook_watch.lua: a task to watch for its webhook (X-Callback-URL): its record, and its first
-- poll in the due set. The record is a JSON object; every replica works on it (hook_claim.lua).
-- KEYS  1 hooks hash (id -> record)   2 due sorted set (id, due ms)
-- payload: hook {id, team, task, url, sid}, delay_ms (the first poll)
-- Returns 1 when recorded, 0 when that id was already there
local now = clock()
local h = p.hook
if redis.call('HEXISTS', KEYS[1], h.id) == 1 then return 0 end
h.state, h.created, h.started, h.failed = 'polling', now, 0, 0
h.polls, h.attempts, h.claims = 0, 0, 0
h.lease, h.error, h.status = '', '', ''
redis.call('HSET', KEYS[1], h.id, cjson.encode(h))
redis.call('ZADD', KEYS[2], now + p.delay_ms, h.id)
return 1
