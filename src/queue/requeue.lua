-- Hand a job back to the head of the queue (shutdown before it could run or
-- finish), without counting the delivery as an attempt.
--
-- KEYS[1] queue            KEYS[2] the worker's processing list
-- KEYS[3] attempts hash
-- ARGV[1] the raw payload  ARGV[2] job id ('' when the job has none)
local removed = redis.call('LREM', KEYS[2], 1, ARGV[1])
if removed == 1 then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  if ARGV[2] ~= '' then
    redis.call('HDEL', KEYS[3], ARGV[2] .. ' delivery')
    local left = redis.call('HINCRBY', KEYS[3], ARGV[2], -1)
    if left <= 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
  end
end
return removed
