//! Every Redis key sandq uses, built in this one place from the prefix.

/// Key names under one prefix `<p>`.
#[derive(Debug, Clone)]
pub struct Keys {
    prefix: String,
}

impl Keys {
    pub fn new(prefix: &str) -> Keys {
        Keys {
            prefix: prefix.to_owned(),
        }
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// `<p>:queue`: producers RPUSH job JSON here.
    pub fn queue(&self) -> String {
        format!("{}:queue", self.prefix)
    }

    /// `<p>:processing:<worker>`: jobs a worker has taken and not finished.
    pub fn processing(&self, worker_id: &str) -> String {
        format!("{}:processing:{worker_id}", self.prefix)
    }

    /// `<p>:dead`: payloads that cannot be run, with the reason.
    pub fn dead(&self) -> String {
        format!("{}:dead", self.prefix)
    }

    /// `<p>:result:<id>`: the default reply key.
    pub fn result(&self, id: &str) -> String {
        format!("{}:result:{id}", self.prefix)
    }

    /// `<p>:result:client:<name>`: one list that collects the results of many
    /// jobs of one client (a batch run, a gateway) named as their `reply_to`,
    /// so the client waits on one key instead of one per job. It lies in the
    /// result namespace, which workers accept as a reply key.
    pub fn client_results(&self, name: &str) -> String {
        format!("{}:result:client:{name}", self.prefix)
    }

    /// `<p>:done:<id>`: set when a job's result has been pushed.
    pub fn done(&self, id: &str) -> String {
        format!("{}:done:{id}", self.prefix)
    }

    /// `<p>:attempts`: hash of job id to deliveries so far.
    pub fn attempts(&self) -> String {
        format!("{}:attempts", self.prefix)
    }

    /// `<p>:worker:<id>`: a worker's heartbeat, with a TTL.
    pub fn worker(&self, worker_id: &str) -> String {
        format!("{}:worker:{worker_id}", self.prefix)
    }

    /// `<p>:workers`: sorted set of worker ids by last heartbeat (ms).
    pub fn workers(&self) -> String {
        format!("{}:workers", self.prefix)
    }

    /// Whether a producer-chosen reply key may be used: it must not be one of
    /// sandq's own keys (a job could otherwise write into the queue itself),
    /// except the result namespace.
    pub fn reply_key_allowed(&self, key: &str) -> bool {
        let own = format!("{}:", self.prefix);
        !key.is_empty() && (!key.starts_with(&own) || key.starts_with(&format!("{own}result:")))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        let k = Keys::new("t1");
        assert_eq!(k.queue(), "t1:queue");
        assert_eq!(k.processing("w"), "t1:processing:w");
        assert_eq!(k.result("j"), "t1:result:j");
        assert!(k.reply_key_allowed("myapp:replies:1"));
        assert!(k.reply_key_allowed("t1:result:custom"));
        assert!(k.reply_key_allowed(&k.client_results("batch-1")));
        assert!(!k.reply_key_allowed("t1:queue"));
        assert!(!k.reply_key_allowed("t1:processing:w"));
    }
}
