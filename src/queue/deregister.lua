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
-- LMOVE checks both lists' types before it moves anything.
local moved = 0
while redis.call('LMOVE', KEYS[1], KEYS[2], 'RIGHT', 'LEFT') do
  moved = moved + 1
end
redis.call('DEL', KEYS[3])
redis.call('ZREM', KEYS[4], ARGV[1])
return moved
