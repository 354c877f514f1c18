//! Did-you-mean suggestions for misspelt keys.
//!
//! Owns only string distance; it must never decide whether a key is valid.

/// Edit distance (insertions, deletions, substitutions) between two strings, by characters.
pub(crate) fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut prev: Vec<usize> = (0..=b.len()).collect();
    let mut cur = vec![0; b.len() + 1];
    for (i, ca) in a.chars().enumerate() {
        cur[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let substitution = prev[j] + usize::from(ca != *cb);
            cur[j + 1] = substitution.min(prev[j + 1] + 1).min(cur[j] + 1);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    prev[b.len()]
}

/// The known word closest to `word` (case-insensitively), if it is close enough to be a typo.
pub(crate) fn closest<'a>(word: &str, known: &[&'a str]) -> Option<&'a str> {
    let word = word.to_ascii_lowercase();
    // Short words tolerate one edit; longer ones about a third of their length.
    let limit = (word.chars().count() / 3).max(1);
    known
        .iter()
        .map(|k| (edit_distance(&word, &k.to_ascii_lowercase()), *k))
        .filter(|(d, _)| *d <= limit)
        .min_by_key(|(d, _)| *d)
        .map(|(_, k)| k)
}

/// The fix text for an unknown key: a suggestion when one is close, else the known keys.
pub(crate) fn unknown_key_fix(word: &str, known: &[&str]) -> String {
    match closest(word, known) {
        Some(k) => format!("did you mean `{k}`?"),
        None => format!("known keys here: {}", known.join(", ")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn distance() {
        assert_eq!(edit_distance("kitten", "sitting"), 3);
        assert_eq!(edit_distance("", "abc"), 3);
        assert_eq!(edit_distance("same", "same"), 0);
    }

    #[test]
    fn suggestions() {
        let known = ["service_id", "state_dir", "hub", "hub_ca"];
        assert_eq!(closest("servce_id", &known), Some("service_id"));
        assert_eq!(closest("Service_ID", &known), Some("service_id"));
        assert_eq!(closest("hb", &known), Some("hub"));
        assert_eq!(closest("completely_else", &known), None);
        assert!(unknown_key_fix("zzz", &known).starts_with("known keys here: service_id"));
    }
}
