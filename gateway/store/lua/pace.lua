-- pace.lua: book one account's next slot outside the queue (a retry, a reconciler's poll).
-- KEYS 1 upstream schedule   payload: account (as in lib_slots.lua), queue_ms
-- Returns {1, delay ms} when a slot is booked (wait that long, then send),
--         {0, retry ms} when it would come later than the caller may wait.
local _, order = load_accounts(KEYS[1], {p.account})
local a = order[1]
local delay = free_at(a) - now
if delay > p.queue_ms then return {0, math.ceil(delay - p.queue_ms)} end
book(KEYS[1], a)
return {1, math.ceil(delay)}
