-- Move a payload that cannot be run as a job to the dead-letter list.
--
-- KEYS[1] dead list        KEYS[2] the worker's processing list
-- ARGV[1] the dead-letter entry JSON {"reason", "payload", ...}
-- ARGV[2] the raw payload as taken from the queue
redis.call('RPUSH', KEYS[1], ARGV[1])
redis.call('LREM', KEYS[2], 1, ARGV[2])
return 1
