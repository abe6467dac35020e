-- Deliver a job's result exactly once, then forget the job, in one atomic step.
--
-- KEYS[1] reply key        KEYS[2] the worker's processing list
-- KEYS[3] done marker      KEYS[4] attempts hash
-- ARGV[1] result JSON      ARGV[2] result TTL (seconds)
-- ARGV[3] the raw job payload as taken from the queue
-- ARGV[4] job id
--
-- The done marker makes a second delivery of the same job id (a job re-run
-- after its worker was presumed dead) push nothing: one result per job id.
-- Returns 1 when this call pushed the result, 0 when one was already pushed.
local first = redis.call('SET', KEYS[3], '1', 'NX', 'EX', ARGV[2])
if first then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
redis.call('LREM', KEYS[2], 1, ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[4])
if first then return 1 end
return 0
