-- Claim or refresh a worker id's heartbeat, scored by Redis' own clock.
--
-- KEYS[1] <p>:worker:<id> (heartbeat, with a TTL)   KEYS[2] <p>:workers
-- ARGV[1] this worker's heartbeat value (it names the process: host, pid,
--         a random instance id)   ARGV[2] TTL (ms)   ARGV[3] worker id
--
-- The id belongs to whoever holds the live heartbeat key: a second process
-- started with the same id gets 0 and must not run (it would hand back, and
-- re-run, the jobs of the first). A key that expired (a long outage, a
-- frozen process) is taken again by its first claimant.
-- Scores are Redis' time (ms), never a worker's clock, so a worker whose
-- clock runs fast or slow is reaped on time.
-- Returns 1 when the heartbeat is ours, 0 when another process holds the id.
local held = redis.call('GET', KEYS[1])
if held and held ~= ARGV[1] then
  return 0
end
local kind = redis.call('TYPE', KEYS[2])['ok']
if kind ~= 'none' and kind ~= 'zset' then
  return redis.error_reply('worker registry ' .. KEYS[2] .. ' is not a sorted set')
end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('ZADD', KEYS[2], now, ARGV[3])
return 1
