-- Hand a job back to the head of the queue (shutdown before it could run or
-- finish), without counting the delivery as an attempt.
--
-- KEYS[1] queue            KEYS[2] the worker's processing list
-- KEYS[3] attempts hash
-- ARGV[1] the raw payload  ARGV[2] job id ('' when the job has none)
--
-- The queue's type is checked before the job leaves the processing list:
-- a script that fails midway keeps the writes it made, and the job would be
-- gone from both.
local kind = redis.call('TYPE', KEYS[1])['ok']
if kind ~= 'none' and kind ~= 'list' then
  return redis.error_reply('queue ' .. KEYS[1] .. ' is not a list')
end
local removed = redis.call('LREM', KEYS[2], 1, ARGV[1])
if removed == 1 then
  redis.call('LPUSH', KEYS[1], ARGV[1])
  if ARGV[2] ~= '' and redis.call('TYPE', KEYS[3])['ok'] == 'hash' then
    redis.call('HDEL', KEYS[3], ARGV[2] .. ' delivery')
    local left = redis.call('HINCRBY', KEYS[3], ARGV[2], -1)
    if left <= 0 then redis.call('HDEL', KEYS[3], ARGV[2]) end
  end
end
return removed
