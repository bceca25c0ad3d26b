-- hook_failed.lua: failed hooks, oldest failure first, a page at a time.
-- KEYS  1 failed sorted set   2 hooks hash
-- payload: limit, after_ms and after_id (the last hook of the previous page; absent: the start)
-- Returns {record, ...}
local out = {}
local offset = 0
while #out < p.limit do
  local ids = redis.call('ZRANGEBYSCORE', KEYS[1], p.after_ms or '-inf', '+inf', 'WITHSCORES',
                         'LIMIT', offset, p.limit + 1)
  if #ids == 0 then break end
  for i = 1, #ids, 2 do
    local id, score = ids[i], tonumber(ids[i + 1])
    if not (p.after_id and score == p.after_ms and id <= p.after_id) and #out < p.limit then
      local raw = redis.call('HGET', KEYS[2], id)
      if raw then out[#out + 1] = raw end
    end
  end
  offset = offset + #ids / 2
end
return out
