//! Protocol extensions and their negotiation (docs/PROTOCOL.md §10).
//!
//! A node lists what it offers in its `hello`; a client answers with the subset
//! it understands; each extension frame or field then goes only to a peer that
//! named it. A v1 peer names nothing, so it sees exactly v1.

use std::fmt;

/// One protocol extension, by its wire name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Capability {
    /// `secure`: Noise XX under the framing (§10.1). Required, not negotiated.
    Secure,
    /// `store`: a content-addressed model store (have / use / resume).
    Store,
    /// `stream`: partial results before the final one.
    Stream,
    /// `sampling`: sampling fields on `infer` / `prompt`.
    Sampling,
    /// `cancel`: cancel a queued or running job by `job_id`.
    Cancel,
    /// `deadline`: a per-job deadline.
    Deadline,
    /// `queue_position`: a job's place in the queue while it waits.
    QueuePosition,
    /// `stats`: the node's counters on request.
    Stats,
    /// `chat`: `prompt` jobs carrying `messages` (or a `raw` prompt), answered
    /// with token counts and a finish reason.
    Chat,
}

const ALL: [Capability; 9] = [
    Capability::Secure,
    Capability::Store,
    Capability::Stream,
    Capability::Sampling,
    Capability::Cancel,
    Capability::Deadline,
    Capability::QueuePosition,
    Capability::Stats,
    Capability::Chat,
];

impl Capability {
    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Capability::Secure => "secure",
            Capability::Store => "store",
            Capability::Stream => "stream",
            Capability::Sampling => "sampling",
            Capability::Cancel => "cancel",
            Capability::Deadline => "deadline",
            Capability::QueuePosition => "queue_position",
            Capability::Stats => "stats",
            Capability::Chat => "chat",
        }
    }

    /// The capability with this wire name; `None` for a name we do not know
    /// (unknown names are ignored, never an error).
    pub fn from_name(name: &str) -> Option<Self> {
        ALL.into_iter().find(|c| c.as_str() == name)
    }

    /// Its bit: its place in `ALL` (a const, for const sets).
    const fn bit(self) -> u16 {
        1 << self as u16
    }
}

impl fmt::Display for Capability {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A set of [`Capability`]s: what a node offers, what a client wants, or what
/// both agreed on for one connection.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Capabilities(u16);

impl Capabilities {
    /// No extension: exactly v1.
    pub const NONE: Capabilities = Capabilities(0);

    /// Whether `cap` is in the set.
    pub fn contains(self, cap: Capability) -> bool {
        self.0 & cap.bit() != 0
    }

    /// The set with `cap` added.
    #[must_use]
    pub const fn with(self, cap: Capability) -> Self {
        Capabilities(self.0 | cap.bit())
    }

    /// The set without `cap`.
    #[must_use]
    pub fn without(self, cap: Capability) -> Self {
        Capabilities(self.0 & !cap.bit())
    }

    /// What either set holds.
    #[must_use]
    pub const fn union(self, other: Capabilities) -> Self {
        Capabilities(self.0 | other.0)
    }

    /// What both sets hold.
    #[must_use]
    pub fn intersect(self, other: Capabilities) -> Self {
        Capabilities(self.0 & other.0)
    }

    /// Whether the set is empty.
    pub fn is_empty(self) -> bool {
        self.0 == 0
    }

    /// The capabilities, in a fixed order.
    pub fn iter(self) -> impl Iterator<Item = Capability> {
        ALL.into_iter().filter(move |c| self.contains(*c))
    }

    /// The wire names, in a fixed order (for a `hello`'s `capabilities`).
    pub fn names(self) -> Vec<String> {
        self.iter().map(|c| c.as_str().to_owned()).collect()
    }

    /// The known capabilities among `names`; unknown names are skipped.
    pub fn from_names<S: AsRef<str>>(names: &[S]) -> Self {
        names
            .iter()
            .filter_map(|n| Capability::from_name(n.as_ref()))
            .collect()
    }
}

impl FromIterator<Capability> for Capabilities {
    fn from_iter<I: IntoIterator<Item = Capability>>(iter: I) -> Self {
        iter.into_iter()
            .fold(Capabilities::NONE, Capabilities::with)
    }
}

impl fmt::Debug for Capabilities {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_set().entries(self.iter()).finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_ignored() {
        let names = ["stream", "warp_drive", "store", "stream"];
        let caps = Capabilities::from_names(&names);
        assert_eq!(caps.names(), ["store", "stream"]);
        assert!(caps.contains(Capability::Store));
        assert!(!caps.contains(Capability::Cancel));
        for cap in ALL.into_iter().collect::<Capabilities>().iter() {
            assert_eq!(Capability::from_name(cap.as_str()), Some(cap));
        }
        assert_eq!(
            ALL.into_iter().collect::<Capabilities>().iter().count(),
            ALL.len()
        );
    }

    #[test]
    fn intersect_keeps_only_what_both_hold() {
        let node = Capabilities::NONE
            .with(Capability::Store)
            .with(Capability::Cancel);
        let client = ALL
            .into_iter()
            .collect::<Capabilities>()
            .without(Capability::Cancel);
        assert_eq!(node.intersect(client).names(), ["store"]);
        assert!(Capabilities::NONE.intersect(client).is_empty());
    }
}
