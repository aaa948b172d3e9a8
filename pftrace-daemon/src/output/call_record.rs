//! One call as a fixed-size binary record, names and files as ids into a
//! string table (one entry per distinct string): the spill of every call
//! (`spill.rs`) and the sorted runs (`sort.rs`) both hold these. The field
//! list is in one place, [`call_fields!`]: a field added to
//! [`crate::pairing::Call`] is one line there (the build fails until it is).
//!
//! Encoding is copying little-endian words: the JSON lines the spill held
//! before (serde_json's string escaping and integer formatting on the event
//! loop, and parsing them back for the trace) took a dense 1 M-call launch's
//! daemon from 4.5 to 5.9 s of CPU here.

use std::{collections::HashMap, io, sync::Arc};

use crate::{
    fast_hash::FastMap,
    pairing::{Call, CallEnd},
};

/// A value of a [`Call`] field as record bytes.
pub trait Field: Sized {
    const BYTES: usize;
    fn put(&self, strings: &mut StringIds, out: &mut [u8]);
    fn get(bytes: &[u8], table: &[Arc<str>]) -> io::Result<Self>;
}

fn array<const N: usize>(bytes: &[u8]) -> [u8; N] {
    bytes[..N].try_into().expect("a field's bytes")
}

/// Integers as little-endian bytes.
macro_rules! le_field {
    ($($ty:ty),*) => {$(
        impl Field for $ty {
            const BYTES: usize = size_of::<$ty>();
            fn put(&self, _: &mut StringIds, out: &mut [u8]) {
                out.copy_from_slice(&self.to_le_bytes());
            }
            fn get(b: &[u8], _: &[Arc<str>]) -> io::Result<Self> {
                Ok(Self::from_le_bytes(array(b)))
            }
        }
    )*};
}

le_field!(u32, i32, u64);

/// A presence byte, then the value (zeros when absent).
impl Field for Option<u64> {
    const BYTES: usize = 9;
    fn put(&self, s: &mut StringIds, out: &mut [u8]) {
        out[0] = u8::from(self.is_some());
        self.unwrap_or(0).put(s, &mut out[1..]);
    }
    fn get(b: &[u8], t: &[Arc<str>]) -> io::Result<Self> {
        let v = u64::get(&b[1..], t)?;
        match b[0] {
            0 => Ok(None),
            1 => Ok(Some(v)),
            other => Err(bad(format!("presence byte {other}"))),
        }
    }
}

impl Field for CallEnd {
    const BYTES: usize = 1;
    fn put(&self, _: &mut StringIds, out: &mut [u8]) {
        out[0] = match self {
            CallEnd::Returned => 0,
            CallEnd::Incomplete => 1,
        };
    }
    fn get(b: &[u8], _: &[Arc<str>]) -> io::Result<Self> {
        match b[0] {
            0 => Ok(CallEnd::Returned),
            1 => Ok(CallEnd::Incomplete),
            other => Err(bad(format!("call end {other}"))),
        }
    }
}

/// The string's id in the table.
impl Field for Arc<str> {
    const BYTES: usize = 4;
    fn put(&self, strings: &mut StringIds, out: &mut [u8]) {
        strings.id(self).put(strings, out);
    }
    fn get(b: &[u8], table: &[Arc<str>]) -> io::Result<Self> {
        let id = u32::get(b, table)?;
        table.get(id as usize).cloned().ok_or_else(|| bad(format!("string id {id} not in the table")))
    }
}

fn bad(what: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, format!("a stored call record: {what}"))
}

/// Defines the record from the list of [`Call`]'s fields, in record order.
macro_rules! call_fields {
    ($($field:ident: $ty:ty),* $(,)?) => {
        /// Bytes of one record.
        pub const RECORD_BYTES: usize = 0 $(+ <$ty as Field>::BYTES)*;

        /// `call` as a record; its new strings get ids in `strings`.
        pub fn encode(call: &Call, strings: &mut StringIds) -> [u8; RECORD_BYTES] {
            let mut r = [0u8; RECORD_BYTES];
            let mut at = 0;
            $(
                <$ty as Field>::put(&call.$field, strings, &mut r[at..at + <$ty as Field>::BYTES]);
                at += <$ty as Field>::BYTES;
            )*
            debug_assert_eq!(at, RECORD_BYTES);
            r
        }

        /// The call of a record, its strings from `table`.
        #[allow(unused_assignments)] // `at` after the last field
        pub fn decode(r: &[u8; RECORD_BYTES], table: &[Arc<str>]) -> io::Result<Call> {
            let mut at = 0;
            Ok(Call {
                $($field: {
                    let v = <$ty as Field>::get(&r[at..at + <$ty as Field>::BYTES], table)?;
                    at += <$ty as Field>::BYTES;
                    v
                },)*
            })
        }
    };
}

call_fields! {
    pid: u32,
    tid: u32,
    name: Arc<str>,
    file: Arc<str>,
    line: i32,
    start_ns: u64,
    end_ns: u64,
    depth: u32,
    id: u64,
    parent: u64,
    end: CallEnd,
    cpu_ns: Option<u64>,
    rss_entry_bytes: u64,
    rss_return_bytes: u64,
}

/// Ids of strings, in the order they were first seen: looked up by the
/// string's address (the decoder interns names and files, so a call costs
/// no string hashing), then by its text (so a string is in the table once
/// even when two copies of it come in).
pub struct StringIds {
    /// By address, holding the string so the address stays its own.
    by_address: FastMap<usize, (u32, Arc<str>)>,
    by_text: HashMap<Arc<str>, u32, crate::fast_hash::FastState>,
    /// Every string, by id.
    all: Vec<Arc<str>>,
    /// (address, id) of strings looked up lately, by address (0: empty), in
    /// front of `by_address` (which keeps every address its own string's).
    recent: [(usize, u32); RECENT_IDS],
}

/// Slots of [`StringIds::recent`] (a power of two).
const RECENT_IDS: usize = 16;

impl std::fmt::Debug for StringIds {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "StringIds({} strings)", self.len())
    }
}

impl Default for StringIds {
    fn default() -> Self {
        Self {
            by_address: FastMap::default(),
            by_text: HashMap::default(),
            all: Vec::new(),
            recent: [(0, 0); RECENT_IDS],
        }
    }
}

impl StringIds {
    /// The id of `s`, made if new.
    pub fn id(&mut self, s: &Arc<str>) -> u32 {
        let address = Arc::as_ptr(s) as *const u8 as usize;
        let slot = (address.wrapping_mul(0x9e37_79b9_7f4a_7c15) >> 60) & (RECENT_IDS - 1);
        if self.recent[slot].0 == address {
            return self.recent[slot].1;
        }
        if let Some(&(id, _)) = self.by_address.get(&address) {
            self.recent[slot] = (address, id);
            return id;
        }
        let id = match self.by_text.get(s) {
            Some(&id) => id,
            None => {
                let id = u32::try_from(self.all.len()).expect("fewer than 2^32 distinct strings");
                self.all.push(Arc::clone(s));
                self.by_text.insert(Arc::clone(s), id);
                id
            }
        };
        self.by_address.insert(address, (id, Arc::clone(s)));
        self.recent[slot] = (address, id);
        id
    }

    /// Every string, by id.
    pub fn table(&self) -> &[Arc<str>] {
        &self.all
    }

    /// How many strings have ids.
    pub fn len(&self) -> usize {
        self.all.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::output::spill::tests::{call, same};

    #[test]
    fn every_field_survives_and_strings_are_stored_once() {
        let mut ids = StringIds::default();
        let calls: Vec<Call> = (0..1000).map(call).collect();
        let records: Vec<_> = calls.iter().map(|c| encode(c, &mut ids)).collect();
        // "even", "odd \"quoted\"" and "/srv/app.py", though every call has its own copies.
        assert_eq!(ids.len(), 3);
        for (c, r) in calls.iter().zip(&records) {
            assert!(same(c, &decode(r, ids.table()).unwrap()));
        }
        let mut broken = records[1];
        broken[8..12].copy_from_slice(&7u32.to_le_bytes());
        let err = decode(&broken, ids.table()).unwrap_err().to_string();
        assert_eq!(err, "a stored call record: string id 7 not in the table");
    }
}
