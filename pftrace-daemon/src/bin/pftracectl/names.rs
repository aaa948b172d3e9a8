//! `pftracectl add` / `remove`: change the traced names while tracing runs.

use std::path::Path;

use clap::Args;
use pftrace::{
    control,
    protocol::{Command, NamesReply},
};

#[derive(Debug, Args)]
pub struct NamesArgs {
    /// A name: `foo`, `file.py:foo`, a glob like `test_*`, a qualified name
    /// `JSONDecoder.raw_decode` or `json.decoder:*` (MODULE:QUALNAME); see
    /// `pftraced --help` for what each costs. Repeat the flag or separate
    /// names with commas.
    #[arg(short = 't', long = "trace", value_name = "NAME", value_delimiter = ',', required = true)]
    pub names: Vec<String>,
}

pub fn run(socket: &Path, command: Command) -> anyhow::Result<()> {
    let reply: NamesReply = control::request_result(socket, command)?;
    if reply.names.is_empty() {
        println!("now tracing no names (add some with `pftracectl add -t NAME`)");
    } else {
        println!("now tracing: {}", reply.names.join(", "));
    }
    Ok(())
}
