//! Rendering the per-run prescript: the template with this run's uid, gid,
//! network flag, and the user's preload and code obfuscated with a fresh key.
//!
//! The key (512 random bits) never enters the rendered file: the runner hands
//! it to the interpreter on a pipe (fd 3).

use crate::job::Language;
use base64::engine::general_purpose::STANDARD;
use base64::Engine;

const PYTHON: &str = include_str!("../../prescript/python.py");
const NODEJS: &str = include_str!("../../prescript/nodejs.js");

/// Key length in bytes (512 bits).
pub const KEY_LEN: usize = 64;

/// A rendered script and the key that reveals its payload.
pub struct Rendered {
    pub script: String,
    /// Base64 of the key, the first line written to fd 3.
    pub key_b64: String,
    key: [u8; KEY_LEN],
}

impl Rendered {
    /// What fd 3 carries for a script rendered with its code: the key alone.
    pub fn key_line(&self) -> Vec<u8> {
        self.key_b64.as_bytes().to_vec()
    }

    /// What fd 3 carries for a script rendered without code (a pre-started
    /// interpreter): the key, the preload and the code, one line each.
    pub fn payload(&self, preload: &str, code: &str) -> Vec<u8> {
        format!(
            "{}\n{}\n{}",
            self.key_b64,
            obfuscate(preload, &self.key),
            obfuscate(code, &self.key)
        )
        .into_bytes()
    }
}

fn obfuscate(plain: &str, key: &[u8; KEY_LEN]) -> String {
    let mixed: Vec<u8> = plain
        .bytes()
        .zip(key.iter().cycle())
        .map(|(b, k)| b ^ k)
        .collect();
    STANDARD.encode(mixed)
}

pub fn render(
    language: Language,
    uid: u32,
    gid: u32,
    network: bool,
    python_path: &str,
    preload: &str,
    code: &str,
) -> Rendered {
    let mut key = [0u8; KEY_LEN];
    rand::fill(&mut key);
    let template = match language {
        Language::Python3 => PYTHON,
        Language::Nodejs => NODEJS,
    };
    let network = match (language, network) {
        (Language::Python3, true) => "True",
        (Language::Python3, false) => "False",
        (Language::Nodejs, true) => "true",
        (Language::Nodejs, false) => "false",
    };
    // Placeholders are filled in a fixed order and the user's text only ever
    // enters as base64, so nothing it contains can open a placeholder.
    let script = template
        .replacen("{{uid}}", &uid.to_string(), 1)
        .replacen("{{gid}}", &gid.to_string(), 1)
        .replacen("{{enable_network}}", network, 1)
        .replacen("{{python_path}}", python_path, 1)
        .replacen("{{preload}}", &obfuscate(preload, &key), 1)
        .replacen("{{code}}", &obfuscate(code, &key), 1);
    Rendered {
        script,
        key_b64: STANDARD.encode(key),
        key,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn code_never_appears_in_clear_and_keys_differ() {
        let a = render(
            Language::Python3,
            10001,
            10001,
            false,
            "[]",
            "",
            "print('secret-marker')",
        );
        let b = render(
            Language::Python3,
            10001,
            10001,
            false,
            "[]",
            "",
            "print('secret-marker')",
        );
        assert!(!a.script.contains("secret-marker"));
        assert!(!a.script.contains("{{"), "every placeholder is filled");
        assert_ne!(a.key_b64, b.key_b64);
        assert_ne!(a.script, b.script);
        assert!(!a.script.contains(&a.key_b64));
        assert_eq!(STANDARD.decode(&a.key_b64).unwrap().len(), KEY_LEN);
        let n = render(Language::Nodejs, 1, 1, true, "[]", "x", "y");
        assert!(!n.script.contains("{{"));
    }

    #[test]
    fn xor_round_trips() {
        let key = [7u8; KEY_LEN];
        let enc = STANDARD.decode(obfuscate("héllo", &key)).unwrap();
        let dec: Vec<u8> = enc
            .iter()
            .zip(key.iter().cycle())
            .map(|(b, k)| b ^ k)
            .collect();
        assert_eq!(String::from_utf8(dec).unwrap(), "héllo");
    }
}
