//! What a traced Python function is, resolved once per code object.
//!
//! (Docs filled in below as the parts land.)

pub mod info;
pub mod source;
pub mod version;

pub use info::{CodeInfo, CodeObjectFacts, Field, Origin, Params};
pub use source::{FileCodes, SourceCode};
pub use version::PyVersion;
