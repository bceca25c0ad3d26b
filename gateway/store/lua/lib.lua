-- lib.lua: prepended to every script when it is loaded (Redis scripts cannot include files).

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

-- Book the next upstream slot (GCRA): returns true, delay ms to wait before sending; or
-- false, ms until a request would be queued no longer than `queue`.
local function pace(key, interval, burst, queue)
  local tat = tonumber(redis.call('GET', key)) or now
  if tat < now then tat = now end
  local delay = tat - (burst - 1) * interval - now
  if delay < 0 then delay = 0 end
  if delay > queue then return false, delay - queue end
  redis.call('SET', key, string.format('%.3f', tat + interval),
             'PX', math.ceil(tat + interval - now + burst * interval) + 1000)
  return true, delay
end

-- Remove a reservation; returns its period, amount and ledger context, or nil if it is gone.
local function take_reservation(key, id)
  local held = redis.call('HGET', key, id)
  if not held then return nil end
  redis.call('HDEL', key, id)
  local _, period, amount, context = string.match(held, '^(%d+)|([^|]*)|(%d+)|(.*)$')
  return period, tonumber(amount), context
end
