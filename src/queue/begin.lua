-- Start a delivery of job <id>: count it, unless the id already has a result.
--
-- KEYS[1] attempts hash    KEYS[2] done marker
-- ARGV[1] job id
--
-- Returns {delivery number, false}, or {0, stored result JSON} when a result
-- for this id exists (the job is not run again).
local done = redis.call('GET', KEYS[2])
if done then
  return {0, done}
end
return {redis.call('HINCRBY', KEYS[1], ARGV[1], 1), false}
