-- Finish a job held by this worker, in one atomic step: push its result,
-- record a dead letter if there is one, and drop the job from the worker's
-- processing list.
--
-- KEYS[1] reply key         KEYS[2] the worker's processing list
-- KEYS[3] done marker       KEYS[4] attempts hash
-- KEYS[5] default reply key <p>:result:<id>     KEYS[6] dead list
-- ARGV[1] result JSON ('' for none)     ARGV[2] result TTL (seconds)
-- ARGV[3] the raw job payload as taken from the queue
-- ARGV[4] job id ('' when unknown)      ARGV[5] '1': remember the result under the id
-- ARGV[6] done marker value (the status)
-- ARGV[7] the `rejected` result to send to the default key if the reply key
--         holds something that is not a list
-- ARGV[8] dead-letter entry JSON ('' for none)   ARGV[9] dead list cap
--
-- Only a job this worker still holds is finished: if its entry is gone from
-- the processing list, the job was handed to another worker (the reaper
-- judged this one dead) and its result belongs to that worker; nothing is
-- written. This also makes a retried call harmless: a call that timed out on
-- the client but ran here finds the entry gone and pushes nothing again.
--
-- A remembered result marks the id done (a small marker holding the status,
-- not a copy of the result): only the first result for an id is pushed, and
-- a later delivery of the id is not run at all (see begin.lua). Rejections
-- are not remembered, so a corrected job may reuse the id.
--
-- Everything that could fail is checked before the first write: a script
-- that fails midway keeps the writes it made. The first write is the push to
-- the reply key (an ACL may refuse it); the done marker comes after it, so
-- an id is never marked done without its result.
--
-- Returns {outcome, dead-letter entries trimmed}; outcome 1 pushed to the
-- reply key, 0 not pushed (the id already had its result), -1 not held
-- (nothing written), 2 the reply key is not a list: the `rejected` result
-- went to the default key instead, 3 neither key can take a list: nothing
-- written (the caller dead-letters the job).
if not redis.call('LPOS', KEYS[2], ARGV[3]) then
  return {-1, 0}
end
local function usable(key)
  local kind = redis.call('TYPE', key)['ok']
  return kind == 'none' or kind == 'list'
end
local outcome = 1
local target, result, remember = KEYS[1], ARGV[1], ARGV[5] == '1'
if result ~= '' and not usable(target) then
  outcome, target, result, remember = 2, KEYS[5], ARGV[7], false
  if not usable(target) then
    return {3, 0}
  end
end
local dead = ARGV[8]
if dead ~= '' and not usable(KEYS[6]) then
  return redis.error_reply('dead-letter key ' .. KEYS[6] .. ' is not a list')
end
if remember and redis.call('EXISTS', KEYS[3]) == 1 then
  outcome, result = 0, ''
end

if result ~= '' then
  redis.call('RPUSH', target, result)
  redis.call('EXPIRE', target, ARGV[2])
  if remember then
    redis.call('SET', KEYS[3], ARGV[6], 'EX', ARGV[2])
  end
end
local trimmed = 0
if dead ~= '' then
  local len = redis.call('RPUSH', KEYS[6], dead)
  local cap = tonumber(ARGV[9])
  if len > cap then
    redis.call('LTRIM', KEYS[6], len - cap, -1)
    trimmed = len - cap
  end
end
redis.call('LREM', KEYS[2], 1, ARGV[3])
if ARGV[4] ~= '' and redis.call('TYPE', KEYS[4])['ok'] == 'hash' then
  redis.call('HDEL', KEYS[4], ARGV[4], ARGV[4] .. ' delivery')
end
return {outcome, trimmed}
