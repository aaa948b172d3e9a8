//! Trace output formats, one file per format behind the small [`TraceFormat`] trait.

mod chrome;
pub mod events;

use std::io::{self, Write};

pub use chrome::Chrome;

use crate::trace::Trace;

/// A way of writing a trace to a byte stream.
pub trait TraceFormat {
    /// Writes the whole trace.
    fn write(&self, trace: &Trace, out: &mut dyn Write) -> io::Result<()>;
}
