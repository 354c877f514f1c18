//! The table of services the hub knows, shared by the gateway (to admit agents) and the
//! registry (to refuse routing for a switched-off service).
//!
//! Agents are looked up by the hash of their service id; the id itself is only held to derive
//! the handshake PSK and is never logged.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};

use crate::config::hub::ServiceConfig;
use crate::tunnel;

/// What the gateway needs to admit one service's agents.
#[derive(Clone)]
pub struct ServiceAuth {
    pub name: String,
    pub psk: [u8; 32],
    pub enabled: bool,
}

/// Services by lookup hash, plus the on/off switch by name.
#[derive(Clone, Default)]
pub struct ServiceBook {
    inner: Arc<RwLock<HashMap<String, ServiceAuth>>>,
}

impl ServiceBook {
    /// Builds the table from hub.toml's services.
    pub fn new(services: &[ServiceConfig]) -> ServiceBook {
        let map = services
            .iter()
            .map(|s| {
                let id = s.service_id.expose();
                (
                    tunnel::lookup_hash(id),
                    ServiceAuth {
                        name: s.name.clone(),
                        psk: tunnel::service_psk(id),
                        enabled: s.enabled,
                    },
                )
            })
            .collect();
        ServiceBook {
            inner: Arc::new(RwLock::new(map)),
        }
    }

    /// The service an agent names by `lookup_hash`, if it is known.
    pub fn by_lookup(&self, lookup_hash: &str) -> Option<ServiceAuth> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .get(lookup_hash)
            .cloned()
    }

    /// Whether the service called `name` exists and is switched on.
    pub fn is_enabled(&self, name: &str) -> Option<bool> {
        self.inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .find(|s| s.name == name)
            .map(|s| s.enabled)
    }

    /// Switches a service on or off; false when no service has that name.
    pub fn set_enabled(&self, name: &str, enabled: bool) -> bool {
        let mut map = self.inner.write().unwrap_or_else(|p| p.into_inner());
        let mut found = false;
        for s in map.values_mut().filter(|s| s.name == name) {
            s.enabled = enabled;
            found = true;
        }
        found
    }

    /// Service names and their switch, sorted by name.
    pub fn list(&self) -> Vec<(String, bool)> {
        let mut list: Vec<_> = self
            .inner
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|s| (s.name.clone(), s.enabled))
            .collect();
        list.sort();
        list
    }
}
