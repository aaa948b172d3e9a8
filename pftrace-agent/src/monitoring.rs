//! CPython 3.12+: a sys.monitoring tool whose callbacks are C functions.
//!
//! Events as CPython's own profiler pairs them (Python/legacy_tracing.c):
//! PY_START, PY_RESUME and PY_THROW open a call; PY_RETURN, PY_YIELD and
//! PY_UNWIND close it. A callback returns `sys.monitoring.DISABLE` at a code
//! location of a function that is not traced, so it is never called there
//! again in any thread: calls of untraced functions then run at the untraced
//! speed (102.8 -> 102.6 ns a call measured on 3.12-3.15, issue 12).
//! PY_THROW and PY_UNWIND cannot be disabled (before 3.15 returning DISABLE
//! there removes the callback), so those two only fire when an exception
//! passes through a frame and are decided from the cached verdict.

use std::{
    cell::UnsafeCell,
    ffi::{CStr, c_void},
};

use pftrace_common::agent;

use crate::{
    agent_state,
    capi::{Api, FastCall, METH_FASTCALL, Obj, PyMethodDef},
    report, verdict,
};

/// One monitored event: its name in `sys.monitoring.events`, the agent
/// event it reports, and whether DISABLE may be returned for it.
struct Event {
    name: &'static CStr,
    def: PyMethodDef,
}

const fn def(name: &'static CStr, f: FastCall) -> PyMethodDef {
    PyMethodDef {
        ml_name: name.as_ptr(),
        ml_meth: f as *const c_void,
        ml_flags: METH_FASTCALL,
        ml_doc: std::ptr::null(),
    }
}

/// Callback invocations per event, in [`EVENTS`]' order, since the process
/// loaded the agent (read by `pftrace_agent.callbacks()`): what proves that a
/// DISABLEd location is never called again (pftrace-daemon's test
/// agent_disable.rs). One plain increment a callback, under the GIL; a
/// DISABLEd location costs nothing here, as it never calls.
struct Calls(UnsafeCell<[u64; 6]>);
// SAFETY: only touched with the GIL held (callbacks and `callbacks()`).
unsafe impl Sync for Calls {}

static CALLS: Calls = Calls(UnsafeCell::new([0; 6]));

/// `PY_START=n PY_RESUME=n PY_THROW=n PY_RETURN=n PY_YIELD=n PY_UNWIND=n`.
/// The GIL is held.
pub fn callbacks_text() -> String {
    // SAFETY: the GIL is held (see `Calls`).
    let calls = unsafe { *CALLS.0.get() };
    let parts: Vec<String> =
        EVENTS.iter().zip(calls).map(|(ev, n)| format!("{}={n}", ev.name.to_string_lossy())).collect();
    parts.join(" ")
}

static EVENTS: [Event; 6] = [
    Event { name: c"PY_START", def: def(c"pftrace_py_start", on_event::<{ agent::START }, true, 0>) },
    Event { name: c"PY_RESUME", def: def(c"pftrace_py_resume", on_event::<{ agent::RESUME }, true, 1>) },
    Event { name: c"PY_THROW", def: def(c"pftrace_py_throw", on_event::<{ agent::THROW }, false, 2>) },
    Event { name: c"PY_RETURN", def: def(c"pftrace_py_return", on_event::<{ agent::RETURN }, true, 3>) },
    Event { name: c"PY_YIELD", def: def(c"pftrace_py_yield", on_event::<{ agent::YIELD }, true, 4>) },
    Event { name: c"PY_UNWIND", def: def(c"pftrace_py_unwind", on_event::<{ agent::UNWIND }, false, 5>) },
];

/// The tool pftrace holds.
pub struct Tool {
    pub id: i64,
    monitoring: Obj,
    /// `sys.monitoring.DISABLE` (a strong reference).
    disable: Obj,
    /// Event bits registered, as `sys.monitoring.events` gives them.
    event_bits: Vec<i64>,
}

/// Tool ids tried: the two without a conventional owner first, then the
/// optimizer's, and PROFILER_ID (2), COVERAGE_ID (1) and DEBUGGER_ID (0)
/// last: cProfile takes id 2 on 3.12+ and fails if it is held.
const TOOL_IDS: [i64; 6] = [4, 3, 5, 1, 0, 2];

/// Registers the callbacks and turns the events on. The GIL is held.
pub fn enable(api: &Api) -> Result<Tool, String> {
    let sys = api.owned(unsafe { (api.import)(c"sys".as_ptr()) }).ok_or("cannot import sys")?;
    let mon = api.attr(sys.ptr, c"monitoring").ok_or("sys.monitoring is missing")?;
    let get_tool = api.attr(mon.ptr, c"get_tool").ok_or("sys.monitoring.get_tool is missing")?;
    let id = TOOL_IDS
        .iter()
        .copied()
        .find(|&id| {
            let Some(i) = api.int(id) else { return false };
            api.call(get_tool.ptr, &[i.ptr]).is_some_and(|r| r.ptr == api.none)
        })
        .ok_or("every sys.monitoring tool id (0-5) is taken by other tools")?;
    let call = |name: &CStr, args: &[Obj]| -> Result<(), String> {
        let f = api.attr(mon.ptr, name).ok_or_else(|| format!("sys.monitoring.{name:?} is missing"))?;
        api.call(f.ptr, args).map(drop).ok_or_else(|| format!("sys.monitoring.{name:?} failed"))
    };
    let id_obj = api.int(id).ok_or("int")?;
    let label = api.owned(unsafe { (api.unicode_from)(c"pftrace".as_ptr()) }).ok_or("str")?;
    call(c"use_tool_id", &[id_obj.ptr, label.ptr])?;
    let events = api.attr(mon.ptr, c"events").ok_or("sys.monitoring.events is missing")?;
    let mut bits = Vec::new();
    let mut all = 0i64;
    let result = (|| {
        for ev in &EVENTS {
            let bit = api.attr(events.ptr, ev.name).map(|b| api.as_int(b.ptr)).unwrap_or(-1);
            if bit <= 0 {
                return Err(format!("sys.monitoring.events.{:?} is missing", ev.name));
            }
            let func = api
                .owned(unsafe { (api.cfunction_new)(&ev.def, std::ptr::null_mut(), std::ptr::null_mut()) })
                .ok_or("cannot create a callback")?;
            let bit_obj = api.int(bit).ok_or("int")?;
            call(c"register_callback", &[id_obj.ptr, bit_obj.ptr, func.ptr])?;
            bits.push(bit);
            all |= bit;
        }
        let all_obj = api.int(all).ok_or("int")?;
        call(c"set_events", &[id_obj.ptr, all_obj.ptr])
    })();
    let disable = api.attr(mon.ptr, c"DISABLE").map(|d| d.into_raw());
    let tool = Tool {
        id,
        monitoring: mon.into_raw(),
        disable: disable.unwrap_or(std::ptr::null_mut()),
        event_bits: bits,
    };
    match result {
        Ok(()) if !tool.disable.is_null() => Ok(tool),
        Ok(()) => {
            disable_tool(api, tool);
            Err("sys.monitoring.DISABLE is missing".into())
        }
        Err(e) => {
            disable_tool(api, tool);
            Err(e)
        }
    }
}

/// Turns every event off, unregisters the callbacks and frees the tool id.
/// The GIL is held. Errors are cleared: this runs on the way out.
pub fn disable_tool(api: &Api, tool: Tool) {
    let mon = tool.monitoring;
    let call = |name: &CStr, args: &[Obj]| {
        if let Some(f) = api.attr(mon, name) {
            drop(api.call(f.ptr, args));
        }
    };
    if let (Some(id), Some(zero)) = (api.int(tool.id), api.int(0)) {
        call(c"set_events", &[id.ptr, zero.ptr]);
        for &bit in &tool.event_bits {
            if let Some(b) = api.int(bit) {
                call(c"register_callback", &[id.ptr, b.ptr, api.none]);
            }
        }
        call(c"free_tool_id", &[id.ptr]);
    }
    unsafe {
        (api.dec_ref)(mon);
        if !tool.disable.is_null() {
            (api.dec_ref)(tool.disable);
        }
    }
}

/// `sys.monitoring.restart_events()`: locations disabled under the old
/// names call the callbacks again, to be decided under the new ones.
pub fn restart(api: &Api, tool: &Tool) {
    if let Some(f) = api.attr(tool.monitoring, c"restart_events") {
        drop(api.call(f.ptr, &[]));
    }
}

/// Every callback: (code, offset[, value]). Reports the event when the code
/// object is traced; otherwise DISABLE where that is allowed. `SLOT`: this
/// event's place in [`CALLS`].
unsafe extern "C" fn on_event<const EVENT: u8, const LOCAL: bool, const SLOT: usize>(
    _slf: Obj,
    args: *const Obj,
    nargs: isize,
) -> Obj {
    // SAFETY: callbacks run with the GIL held, which guards the agent state.
    let Some((api, state)) = (unsafe { agent_state() }) else {
        return std::ptr::null_mut();
    };
    // SAFETY: the GIL is held (see `Calls`).
    unsafe { (*CALLS.0.get())[SLOT] += 1 };
    // Torn down between the event and this call (not expected: teardown
    // holds the GIL throughout and runs no Python code).
    let Some(tool) = state.tool.as_ref() else {
        return api.none();
    };
    if nargs < 1 || args.is_null() {
        return api.none();
    }
    let code = unsafe { *args };
    match verdict::traced(api, state.extra_index, code, state.generation, &state.matcher) {
        Some(info) => {
            report::report(EVENT, info);
            api.none()
        }
        None if LOCAL => {
            unsafe { (api.inc_ref)(tool.disable) };
            tool.disable
        }
        None => api.none(),
    }
}
