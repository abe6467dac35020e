-- Start a delivery of job <id>: count it, unless the worker no longer holds
-- the job, the id already has a result, or its reply key cannot take one.
--
-- KEYS[1] attempts hash    KEYS[2] done marker    KEYS[3] reply key
-- KEYS[4] the worker's processing list
-- ARGV[1] job id           ARGV[2] this delivery's token (random, per fetch)
-- ARGV[3] the raw job payload as taken from the queue
--
-- Returns {delivery number, done marker or false, state, Redis time (ms)};
-- state 1: run it; 0: not held (reaped while it waited for a slot: another
-- worker has it); 2: the reply key holds something that is not a list
-- (nothing is counted; the worker rejects the job). A done marker means the
-- id has its result: not run again.
-- The time is Redis' own, so that expiry decisions do not depend on the
-- worker's clock. A call retried after a client timeout may have run
-- already: the token (kept in the field "<id> delivery") makes it count
-- the delivery once.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
if not redis.call('LPOS', KEYS[4], ARGV[3]) then
  return {0, false, 0, now}
end
local done = redis.call('GET', KEYS[2])
if done then
  return {0, done, 1, now}
end
local kind = redis.call('TYPE', KEYS[3])['ok']
if kind ~= 'none' and kind ~= 'list' then
  return {0, false, 2, now}
end
local token = ARGV[1] .. ' delivery'
if redis.call('HGET', KEYS[1], token) == ARGV[2] then
  return {tonumber(redis.call('HGET', KEYS[1], ARGV[1])), false, 1, now}
end
redis.call('HSET', KEYS[1], token, ARGV[2])
return {redis.call('HINCRBY', KEYS[1], ARGV[1], 1), false, 1, now}
