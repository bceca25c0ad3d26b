-- lib.lua: prepended to every script when it is loaded (Redis scripts cannot include files).
-- Every script takes one named payload, ARGV[1] (JSON, built in gateway/store/payload.py), and
-- runs on the store's own clock.

-- The store's clock in epoch milliseconds: TIME, read on first use, so a call that never asks
-- (most settlements) reads none. A script that works on it starts with `local now = clock()`.
local clock_ms
local function clock()
  if not clock_ms then
    local t = redis.call('TIME')
    clock_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
  end
  return clock_ms
end
local p = cjson.decode(ARGV[1])

-- A reservation as the reservations hash keeps it: "deadline|period|amount|key|context".
local function reservation(deadline, period, amount, key, context)
  return string.format('%d|%s|%d|%s|%s', deadline, period, amount, key, context)
end

-- Remove a reservation; returns its period, amount, key and ledger context, or nil if gone.
local function take_reservation(hash, id)
  local held = redis.call('HGET', hash, id)
  if not held then return nil end
  redis.call('HDEL', hash, id)
  local _, period, amount, key, context = string.match(held, '^(%d+)|([^|]*)|(%d+)|([^|]*)|(.*)$')
  return period, tonumber(amount), key, context
end

-- Move `amount` out of (or, negative, into) a period's `reserved`, for the team and, when
-- `key` is set ("<key id>/<its own period>"), for the key's own budget. Returns the team's
-- `reserved` after it, or nil for an amount of 0 (nothing written).
local function unreserve(hash, period, amount, key)
  if amount == 0 then return nil end
  local left = redis.call('HINCRBY', hash, 'reserved:' .. period, -amount)
  if key ~= '' then redis.call('HINCRBY', hash, 'k:' .. key .. ':reserved', -amount) end
  return left
end

-- Add `amount` to a period's `spent`; returns the team's `spent` after it, or nil for 0.
local function spend(hash, period, amount, key)
  if amount == 0 then return nil end
  local total = redis.call('HINCRBY', hash, 'spent:' .. period, amount)
  if key ~= '' then redis.call('HINCRBY', hash, 'k:' .. key .. ':spent', amount) end
  return total
end

-- A ledger event: the reservation's JSON context (an object) with the outcome's fields added.
local function event(context, fields)
  return string.sub(context, 1, -2) .. fields .. '}'
end

-- Append to a ledger stream, kept within its retention and its length (`ledger`: {min_id,
-- max_len}, as text).
local function record(key, ledger, entry)
  redis.call('XADD', key, 'MAXLEN', ledger.max_len, '*', 'e', entry)
  redis.call('XTRIM', key, 'MINID', ledger.min_id)
end
