-- Start a delivery of job <id>: count it, unless the id already has a result
-- or its reply key cannot take one.
--
-- KEYS[1] attempts hash    KEYS[2] done marker    KEYS[3] reply key
-- ARGV[1] job id
--
-- Returns {delivery number, done marker or false, reply key usable (1/0), Redis time (ms)}.
-- The delivery number is 0 when the job is not to be run: its id has a
-- result (the done marker is returned), or its reply key holds something
-- that is not a list (nothing is counted; the worker rejects the job).
-- The time is Redis' own, so that expiry decisions do not depend on the
-- worker's clock.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local done = redis.call('GET', KEYS[2])
if done then
  return {0, done, 1, now}
end
local kind = redis.call('TYPE', KEYS[3])['ok']
if kind ~= 'none' and kind ~= 'list' then
  return {0, false, 0, now}
end
return {redis.call('HINCRBY', KEYS[1], ARGV[1], 1), false, 1, now}
