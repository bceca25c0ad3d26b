-- hook_redeliver.lua: a failed hook goes back to work at once, with the same webhook id: to be
-- delivered again if its task's final body is known, else to poll its task again.
-- KEYS  1 hooks hash   2 due sorted set   3 bodies hash   4 failed sorted set
-- payload: id
-- Returns 1 when the hook is due again, 0 when no failed hook has that id
local now = clock()
local raw = redis.call('HGET', KEYS[1], p.id)
if not raw then return 0 end
local h = cjson.decode(raw)
if h.state ~= 'failed' then return 0 end
if redis.call('HEXISTS', KEYS[3], p.id) == 1 then
  h.state = 'delivering'
else
  h.state, h.created = 'polling', now
end
h.started, h.failed, h.attempts, h.error, h.lease = now, 0, 0, '', ''
redis.call('HSET', KEYS[1], p.id, cjson.encode(h))
redis.call('ZREM', KEYS[4], p.id)
redis.call('ZADD', KEYS[2], now, p.id)
return 1
