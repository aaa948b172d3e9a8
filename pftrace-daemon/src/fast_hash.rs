//! The hasher of the maps looked up per record (interning, pairing, string
//! ids, per-call tallies): foldhash, the hasher hashbrown itself defaults to
//! (already in the build through it). Std's SipHash showed in the dense
//! run's profile (`Decoder::intern`, `Hasher::write`); foldhash is several
//! times faster on short keys, and its seed is random per map, so names a
//! traced program chooses cannot be picked to collide ahead of time (a fixed
//! hash such as FxHash could be).

use std::collections::HashMap;

/// The hasher state: random per map.
pub type FastState = foldhash::fast::RandomState;

/// A HashMap with [`FastState`].
pub type FastMap<K, V> = HashMap<K, V, FastState>;
