//! pftrace's in-process agent: a CPython extension module (`pftrace_agent`,
//! one shared object for 3.11-3.15+) for interpreters whose USDT probes do
//! not fire. It decides once per code object whether the function is traced
//! (pftrace's three name forms), reports each traced call's start and end
//! to the kernel (see `report`), and follows pftraced's name changes over a
//! control socket; when pftraced goes away it removes every hook.
//!
//! Python sees `start(socket_path)`, `stop()`, `status()` and `callbacks()`
//! (sys.monitoring callbacks called, per event), none of which
//! raises: a failure is a status string (the loader script prints it).
//!
//! Mechanisms: `monitoring` (3.12+, sys.monitoring with C callbacks and
//! DISABLE for untraced locations) and `profile` (3.11, a C profile function
//! on every thread). The GIL guards the agent state: callbacks, the profile
//! function and the control thread's changes all hold it.

/// The batched road (issue 12): events batched per thread, drained by the kernel.
pub mod batch;
mod capi;
mod control;
mod monitoring;
/// Prototype (issue 12): one kernel entry per traced call.
pub mod onecall;
mod profile;
pub mod protocol;
mod report;
/// The syscall report, for agent-bench to time the road by itself.
pub use report::report_syscall;
mod verdict;

/// pftrace's name forms, the same crate the daemon uses.
use pftrace_names as names;

use std::{
    cell::UnsafeCell,
    ffi::{c_int, c_void},
    io::BufReader,
    path::PathBuf,
    ptr,
    sync::{OnceLock, atomic::Ordering},
    time::Duration,
};

use capi::{Api, METH_NOARGS, METH_O, Obj, PlainCall, PyMethodDef, PyModuleDef, PyModuleDefBase, PyObject};
use verdict::Matcher;

/// How long `start` waits for pftraced's first answer.
const SETUP_TIMEOUT: Duration = Duration::from_secs(5);

/// Agent state, guarded by the GIL (never touched without it).
pub struct State {
    pub matcher: Matcher,
    /// Bumped at every change of names; verdicts of older ones are redone.
    pub generation: u32,
    /// The code extra slot holding verdicts (-1: not requested yet).
    pub extra_index: isize,
    /// 3.12+: the sys.monitoring tool while tracing.
    pub tool: Option<monitoring::Tool>,
    /// 3.11: the profile function is set.
    pub profiling: bool,
    pub socket_path: Option<PathBuf>,
    pub status: String,
    /// atexit and fork hooks registered (once per process).
    pub hooks_registered: bool,
}

struct Gil<T>(UnsafeCell<T>);
// SAFETY: only accessed with the GIL held (one thread at a time).
unsafe impl<T> Sync for Gil<T> {}

static STATE: Gil<State> = Gil(UnsafeCell::new(State {
    matcher: Matcher::new(),
    generation: 0,
    extra_index: -1,
    tool: None,
    profiling: false,
    socket_path: None,
    status: String::new(),
    hooks_registered: false,
}));

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// The resolved C API (None outside CPython or when a symbol is missing).
pub fn api() -> Option<&'static Api> {
    API.get().and_then(|r| r.as_ref().ok())
}

/// The API and the state.
///
/// # Safety
/// The GIL must be held, and the returned state not kept past releasing it.
pub unsafe fn agent_state() -> Option<(&'static Api, &'static mut State)> {
    Some((api()?, unsafe { &mut *STATE.0.get() }))
}

/// Whether the agent is tracing.
fn is_tracing(state: &State) -> bool {
    state.tool.is_some() || state.profiling
}

/// Applies a new set of names (GIL held); the generation now in force.
pub fn apply_names(api: &Api, names: &[String]) -> Option<u32> {
    let state = unsafe { agent_state() }?.1;
    let (matcher, _invalid) = Matcher::parse(names);
    state.matcher = matcher;
    state.generation = state.generation.wrapping_add(1).max(1);
    if let Some(tool) = &state.tool {
        monitoring::restart(api, tool);
    }
    Some(state.generation)
}

/// Removes every hook (GIL held).
pub fn teardown(api: &Api, why: &str) {
    report::set_mode(report::OFF);
    batch::turn_off();
    onecall::turn_off();
    let Some((_, state)) = (unsafe { agent_state() }) else { return };
    if let Some(tool) = state.tool.take() {
        monitoring::disable_tool(api, tool);
    }
    if state.profiling {
        state.profiling = false;
        let _ = profile::set_all(api, false);
    }
    state.status = format!("stopped: {why}");
}

/// `start(socket_path)`: connects to pftraced, waits for the names, and
/// starts tracing. Returns a status string; never raises.
unsafe extern "C" fn py_start(_m: Obj, arg: Obj) -> Obj {
    let Some(api) = api() else { return ptr::null_mut() };
    let msg = std::panic::catch_unwind(|| start(api, arg)).unwrap_or_else(|_| Err("internal error".into()));
    let text = match msg {
        Ok(s) => s,
        Err(e) => format!("not tracing: {e}"),
    };
    let c = std::ffi::CString::new(text).unwrap_or_default();
    let s = unsafe { (api.unicode_from)(c.as_ptr()) };
    if s.is_null() {
        api.clear_error();
        return api.none();
    }
    s
}

fn start(api: &Api, arg: Obj) -> Result<String, String> {
    let state = unsafe { agent_state() }.ok_or("no C API")?.1;
    if is_tracing(state) {
        return Ok(state.status.clone());
    }
    let mut len = 0isize;
    let p = unsafe { (api.unicode_utf8)(arg, &mut len) };
    if p.is_null() {
        api.clear_error();
        return Err("start() takes the control socket's path as a str".into());
    }
    let path = PathBuf::from(
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) })
            .into_owned(),
    );
    let python = api.minor();
    if python < (3, 11) {
        return Err(format!(
            "CPython {}.{} is not supported by the agent (3.11 or later)",
            python.0, python.1
        ));
    }
    if !api.has_monitoring() && profile::other_profiler(api) {
        return Err("a profiler is already set (sys.setprofile); on 3.11 pftrace would replace it".into());
    }
    // Talk to pftraced without the GIL: other threads keep running.
    let tstate = unsafe { (api.save_thread)() };
    let setup = control::connect(&path, SETUP_TIMEOUT, python).and_then(|(s, slots)| {
        let mut r = BufReader::new(s);
        control::read_setup(&mut r).map(|(m, names)| (r, m, names, slots))
    });
    unsafe { (api.restore_thread)(tstate) };
    let (reader, mode, names, slots) = setup?;
    if state.extra_index < 0 {
        state.extra_index = unsafe { (api.request_extra_index)(Some(verdict::free_slot)) };
        if state.extra_index < 0 {
            api.clear_error();
            return Err("no code extra slot left".into());
        }
    }
    let generation = apply_names(api, &names).ok_or("state")?;
    // Measurement only (agent-bench --nop1): call the 1-byte-nop probe.
    report::use_nop1(std::env::var_os("PFTRACE_AGENT_BENCH_NOP1").is_some());
    report::always_strings(std::env::var_os("PFTRACE_AGENT_BENCH_RETURN_STRINGS").is_some());
    // Prototype (agent-bench only): one kernel entry per call. Without the
    // slots' fd (only agent-bench passes one) the process is traced the
    // usual way, not refused; agent-bench checks the kinds of records it gets.
    let _ = onecall::from_env();
    batch::from_env();
    // The batched road, when pftraced gave the slots (the default).
    if let Some(fd) = slots
        && onecall::from_fd(&fd).is_ok()
    {
        batch::turn_on();
    }
    // A new pftraced (or the same one anew): it has none of our strings.
    report::new_session();
    report::set_road(mode);
    if api.has_monitoring() {
        state.tool = Some(monitoring::enable(api).inspect_err(|_| report::set_mode(report::OFF))?);
    } else {
        profile::set_all(api, true).inspect_err(|_| report::set_mode(report::OFF))?;
        state.profiling = true;
    }
    register_hooks(api, state);
    state.socket_path = Some(path.clone());
    state.status = format!(
        "tracing: report={} {} names={}",
        mode.as_str(),
        match &state.tool {
            Some(t) => format!("sys.monitoring tool={}", t.id),
            None => "profile-hook".into(),
        },
        names.len()
    );
    if protocol::send(&mut reader.get_ref(), &protocol::ok_line(generation)).is_err()
        || control::spawn(reader).is_err()
    {
        teardown(api, "the control socket failed");
        return Err("the control socket failed".into());
    }
    Ok(state.status.clone())
}

/// atexit: stop before the interpreter finalizes, so the control thread never
/// takes the GIL of an exiting interpreter; and a fork handler.
fn register_hooks(api: &Api, state: &mut State) {
    if state.hooks_registered {
        return;
    }
    state.hooks_registered = true;
    let make = |def: &'static PyMethodDef| {
        api.owned(unsafe { (api.cfunction_new)(def, ptr::null_mut(), ptr::null_mut()) })
    };
    if let (Some(atexit), Some(f)) =
        (api.owned(unsafe { (api.import)(c"atexit".as_ptr()) }), make(&AT_EXIT_DEF))
        && let Some(register) = api.attr(atexit.ptr, c"register")
    {
        drop(api.call(register.ptr, &[f.ptr]));
    }
    // os.register_at_fork(after_in_child=f): keyword-only, so call through a kwargs dict.
    if let (Some(os), Some(f)) = (api.owned(unsafe { (api.import)(c"os".as_ptr()) }), make(&AFTER_FORK_DEF))
        && let Some(register) = api.attr(os.ptr, c"register_at_fork")
        && let Some(kwargs) = api.owned(unsafe { (api.dict_new)() })
    {
        unsafe {
            if (api.dict_set_item_string)(kwargs.ptr, c"after_in_child".as_ptr(), f.ptr) == 0
                && let Some(args) = api.owned((api.tuple_new)(0))
            {
                drop(api.owned((api.call_kw)(register.ptr, args.ptr, kwargs.ptr)));
            }
        }
    }
    api.clear_error();
}

unsafe extern "C" fn at_exit(_m: Obj, _a: Obj) -> Obj {
    let Some(api) = api() else { return ptr::null_mut() };
    control::FINALIZING.store(true, Ordering::Release);
    control::shut_socket();
    teardown(api, "the interpreter is exiting");
    api.none()
}

/// In a forked child: the socket is the parent's (close our copy, never
/// shut it down), and the control thread did not survive the fork. Keep
/// tracing with the names inherited, and connect anew in the background;
/// if pftraced does not answer, stop.
unsafe extern "C" fn after_fork(_m: Obj, _a: Obj) -> Obj {
    let Some(api) = api() else { return ptr::null_mut() };
    // Before any report: the probe's page may hold the parent's optimised
    // uprobe call (see report::remap_probe_pages). Without it, stop.
    if let Err(e) = report::remap_probe_pages() {
        teardown(api, &format!("after fork: {e}"));
        return api.none();
    }
    // A new process to pftraced: it has none of our strings under this pid.
    report::new_session();
    onecall::after_fork();
    control::FINALIZING.store(false, Ordering::Release);
    let fd = control::SOCKET_FD.swap(-1, Ordering::AcqRel);
    if fd >= 0 {
        unsafe { libc::close(fd) };
    }
    let Some((_, state)) = (unsafe { agent_state() }) else { return api.none() };
    if let (true, Some(path)) = (is_tracing(state), state.socket_path.clone()) {
        let python = api.minor();
        let spawned = std::thread::Builder::new().name("pftrace-agent".into()).spawn(move || {
            match control::connect(&path, SETUP_TIMEOUT, python) {
                // The slots stay mapped from the parent: the fd is not needed.
                Ok((s, _slots)) => {
                    if control::spawn(BufReader::new(s)).is_err() {
                        control::stop_from_thread("cannot start the control thread after fork");
                    }
                }
                Err(e) => control::stop_from_thread(&e),
            }
        });
        if spawned.is_err() {
            teardown(api, "cannot start a thread after fork");
        }
    }
    api.none()
}

/// `stop()`: stop tracing now.
unsafe extern "C" fn py_stop(_m: Obj, _a: Obj) -> Obj {
    let Some(api) = api() else { return ptr::null_mut() };
    control::shut_socket();
    teardown(api, "stop() was called");
    api.none()
}

/// `status()`: what the agent is doing, as a str.
unsafe extern "C" fn py_status(_m: Obj, _a: Obj) -> Obj {
    let Some((api, state)) = (unsafe { agent_state() }) else { return ptr::null_mut() };
    let text = if state.status.is_empty() { "not started".to_string() } else { state.status.clone() };
    // The generation stays last: scripts read it as the status's tail.
    let text = format!("{text}; reporting by {}; generation={}", report::road(), state.generation);
    let c = std::ffi::CString::new(text).unwrap_or_default();
    let s = unsafe { (api.unicode_from)(c.as_ptr()) };
    if s.is_null() {
        api.clear_error();
        return api.none();
    }
    s
}

/// `callbacks()`: the sys.monitoring callbacks called so far, per event, as
/// a str (`PY_START=n PY_RESUME=n ...`; all 0 on 3.11, which has none).
unsafe extern "C" fn py_callbacks(_m: Obj, _a: Obj) -> Obj {
    let Some(api) = api() else { return ptr::null_mut() };
    let c = std::ffi::CString::new(monitoring::callbacks_text()).unwrap_or_default();
    let s = unsafe { (api.unicode_from)(c.as_ptr()) };
    if s.is_null() {
        api.clear_error();
        return api.none();
    }
    s
}

const fn method(name: &'static std::ffi::CStr, f: PlainCall, flags: c_int) -> PyMethodDef {
    PyMethodDef { ml_name: name.as_ptr(), ml_meth: f as *const c_void, ml_flags: flags, ml_doc: ptr::null() }
}

static AT_EXIT_DEF: PyMethodDef = method(c"_pftrace_at_exit", at_exit, METH_NOARGS);
static AFTER_FORK_DEF: PyMethodDef = method(c"_pftrace_after_fork", after_fork, METH_NOARGS);

static METHODS: [PyMethodDef; 5] = [
    method(c"start", py_start, METH_O),
    method(c"stop", py_stop, METH_NOARGS),
    method(c"status", py_status, METH_NOARGS),
    method(c"callbacks", py_callbacks, METH_NOARGS),
    PyMethodDef { ml_name: ptr::null(), ml_meth: ptr::null(), ml_flags: 0, ml_doc: ptr::null() },
];

struct ModuleDef(UnsafeCell<PyModuleDef>);
// SAFETY: handed to CPython once, at import, with the GIL held.
unsafe impl Sync for ModuleDef {}

static MODULE: ModuleDef = ModuleDef(UnsafeCell::new(PyModuleDef {
    m_base: PyModuleDefBase {
        // A reference count no one brings to zero (immortal on 3.12+).
        ob_base: PyObject { ob_refcnt: u32::MAX as isize, ob_type: ptr::null_mut() },
        m_init: ptr::null(),
        m_index: 0,
        m_copy: ptr::null_mut(),
    },
    m_name: c"pftrace_agent".as_ptr(),
    m_doc: c"pftrace's in-process agent (see pftraced --help)".as_ptr(),
    m_size: -1,
    m_methods: METHODS.as_ptr(),
    m_slots: ptr::null(),
    m_traverse: ptr::null(),
    m_clear: ptr::null(),
    m_free: ptr::null(),
}));

/// The module's init function, found by Python's import machinery.
///
/// # Safety
/// Called by CPython with the GIL held.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn PyInit_pftrace_agent() -> *mut PyObject {
    let api = match API.get_or_init(|| unsafe { Api::resolve() }) {
        Ok(api) => api,
        // Without the C API there is no way to raise ImportError properly;
        // NULL without an exception makes Python raise SystemError, which the
        // loader script catches and reports.
        Err(_) => return ptr::null_mut(),
    };
    unsafe { (api.module_create)(MODULE.0.get(), capi::PYTHON_API_VERSION) }
}
