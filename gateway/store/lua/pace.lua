-- pace.lua: book the next upstream slot of the organisation, outside `admit` (retries, polls).
-- KEYS 1 pacing key   payload: interval_ms, burst, queue_ms
-- Returns {1, delay ms} when a slot is booked (wait that long, then send),
--         {0, retry ms} when the queue is longer than the caller may wait.
local booked, wait = pace(KEYS[1], p.interval_ms, p.burst, p.queue_ms)
return {booked and 1 or 0, math.ceil(wait)}
