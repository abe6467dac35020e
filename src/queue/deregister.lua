-- A worker leaving cleanly: anything still in its processing list goes back
-- to the head of the queue (uncounted), then its heartbeat and registration go.
--
-- KEYS[1] <p>:processing:<id>   KEYS[2] <p>:queue
-- KEYS[3] <p>:worker:<id>       KEYS[4] <p>:workers
-- ARGV[1] worker id             ARGV[2] this worker's heartbeat value
--
-- Only the holder of the id leaves this way: when another process holds the
-- heartbeat (this one lost it while frozen or cut off), the list is that
-- process's and nothing is touched.
-- Returns the number of jobs handed back, or -1 when the id is not ours.
local held = redis.call('GET', KEYS[3])
if held and held ~= ARGV[2] then
  return -1
end
local moved = 0
while true do
  local job = redis.call('RPOP', KEYS[1])
  if not job then break end
  redis.call('LPUSH', KEYS[2], job)
  moved = moved + 1
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return moved
