//! pftraced's side of the in-process agent (`pftrace-agent`), as library code
//! the daemon will use: the kernel report path (`kernel`), the control
//! socket (`server`), installing the agent's files (`install`), starting a
//! command with the agent (`launch`) and loading it into a running CPython
//! 3.14+ through PEP 768 (`remote`).

pub mod install;
pub mod kernel;
pub mod launch;
pub mod remote;
pub mod server;
