-- Deliver a job's result, then forget the job, in one atomic step.
--
-- KEYS[1] reply key        KEYS[2] the worker's processing list
-- KEYS[3] done marker      KEYS[4] attempts hash
-- ARGV[1] result JSON      ARGV[2] result TTL (seconds)
-- ARGV[3] the raw job payload as taken from the queue
-- ARGV[4] job id           ARGV[5] '1': remember the result under the id
--
-- A remembered result is stored under the id: only the first result for an
-- id is pushed (a job re-run after its worker was presumed dead pushes
-- nothing), and a later delivery of the id is not run at all (see
-- begin.lua). Rejections are pushed but not remembered, so a corrected job
-- may reuse the id.
-- Returns 1 when this call pushed the result, 0 when one was already pushed.
local pushed = 1
if ARGV[5] == '1' then
  if not redis.call('SET', KEYS[3], ARGV[1], 'NX', 'EX', ARGV[2]) then
    pushed = 0
  end
end
if pushed == 1 then
  redis.call('RPUSH', KEYS[1], ARGV[1])
  redis.call('EXPIRE', KEYS[1], ARGV[2])
end
redis.call('LREM', KEYS[2], 1, ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[4])
return pushed
