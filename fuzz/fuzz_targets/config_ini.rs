//! config.ini parsing from a string, as `connect run` and `connect set-target` read the file.
//!
//! Any text is either a configuration whose every target passes the same checks
//! `set-target` applies, or one error that names the file and fits on one line (it is printed
//! as the whole of an administrator's error message). Secrets are not resolved, so no input
//! makes the parser read the environment or a file.
#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use scim_connect::config::agent::{
    parse_hub_url, validate_addr, validate_target_name, AgentConfig,
};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let path = Path::new("/etc/connect/config.ini");
    match AgentConfig::parse_offline(text, path) {
        Ok(config) => {
            parse_hub_url(&config.hub).expect("an accepted hub URL parses");
            for (name, target) in &config.targets {
                assert_eq!(name, &target.name);
                validate_target_name(name).expect("an accepted target name is valid");
                validate_addr(&target.addr).expect("an accepted address is valid");
            }
        }
        Err(e) => {
            let message = e.to_string();
            assert!(
                message.starts_with("/etc/connect/config.ini"),
                "the error does not name the file: {message:?}"
            );
            assert!(
                !message.contains('\n') && !message.contains('\r'),
                "the error is not one line: {message:?}"
            );
        }
    }
});
