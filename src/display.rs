//! Wording shared by the status commands of the agent (`connect status`) and the hub
//! (`connect hub status`), so both say durations the same way. Pure formatting: nothing here
//! reads clocks or state.

/// A duration as an administrator reads it at a glance: the two largest units only.
pub fn coarse_duration(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m {}s", secs / 60, secs % 60),
        3600..86400 => format!("{}h {}m", secs / 3600, secs % 3600 / 60),
        _ => format!("{}d {}h", secs / 86400, secs % 86400 / 3600),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn durations_are_coarse() {
        assert_eq!(coarse_duration(59), "59s");
        assert_eq!(coarse_duration(61), "1m 1s");
        assert_eq!(coarse_duration(7_380), "2h 3m");
        assert_eq!(coarse_duration(90_000), "1d 1h");
    }
}
