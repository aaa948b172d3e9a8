//! CPython 3.11 (no sys.monitoring): a C profile function, set on every
//! thread state so it reaches threads already running (`_PyEval_SetProfile`,
//! what 3.12's PyEval_SetProfileAllThreads does), and on threads started
//! later through `threading.setprofile` with a hook that swaps itself for
//! the C function in the new thread.
//!
//! The profile function is called for every call of every function (3.11
//! cannot disable a location): 165-213 ns a call measured here, and
//! bytecode-heavy bodies run 53-88% slower while it is set (profiling
//! de-specialises). Its events are CPython's profiler's: "call" for a frame
//! starting or a generator resuming, "return" for a return, a yield or an
//! exception leaving the frame.

use std::{
    ffi::{c_int, c_void},
    ptr,
};

use pftrace_common::agent;

use crate::{
    agent_state,
    capi::{Api, FastCall, METH_FASTCALL, Obj, PYTRACE_CALL, PYTRACE_RETURN, PyMethodDef},
    report, verdict,
};

/// The profile function.
unsafe extern "C" fn profile(_obj: Obj, frame: Obj, what: c_int, arg: Obj) -> c_int {
    if what != PYTRACE_CALL && what != PYTRACE_RETURN {
        return 0;
    }
    // SAFETY: profile functions run with the GIL held.
    let Some((api, state)) = (unsafe { agent_state() }) else { return 0 };
    if !state.profiling || frame.is_null() {
        return 0;
    }
    let Some(get_code) = api.frame_get_code else { return 0 };
    let code = unsafe { get_code(frame) };
    if code.is_null() {
        api.clear_error();
        return 0;
    }
    if let Some(info) = verdict::traced(api, state.extra_index, code, state.generation, &state.matcher) {
        let event = match (what, arg.is_null()) {
            (PYTRACE_CALL, _) => agent::START,
            // "return" with no value: an exception is leaving the frame.
            (_, true) => agent::UNWIND,
            (_, false) => agent::RETURN,
        };
        report::report(event, info);
    }
    unsafe { (api.dec_ref)(code) };
    0
}

/// `threading.setprofile` hook, called as a Python-level profile function
/// (frame, event, arg) in a new thread: installs the C profile function for
/// that thread, then handles this first event itself.
unsafe extern "C" fn thread_hook(_slf: Obj, args: *const Obj, nargs: isize) -> Obj {
    let Some((api, _)) = (unsafe { agent_state() }) else { return ptr::null_mut() };
    if let Some(set) = api.set_profile {
        unsafe { set(Some(profile), ptr::null_mut()) };
        api.clear_error();
    }
    if nargs >= 2 && !args.is_null() {
        let (frame, event) = unsafe { (*args, *args.add(1)) };
        let mut len = 0isize;
        let p = unsafe { (api.unicode_utf8)(event, &mut len) };
        if p.is_null() {
            api.clear_error();
        } else if unsafe { std::slice::from_raw_parts(p as *const u8, len as usize) } == b"call" {
            unsafe { profile(ptr::null_mut(), frame, PYTRACE_CALL, ptr::null_mut()) };
        }
    }
    api.none()
}

static HOOK_DEF: PyMethodDef = PyMethodDef {
    ml_name: c"pftrace_thread_hook".as_ptr(),
    ml_meth: thread_hook as FastCall as *const c_void,
    ml_flags: METH_FASTCALL,
    ml_doc: ptr::null(),
};

/// Sets (or with `on` false clears) the profile function on every thread
/// state of this interpreter and the hook for threads started later. The
/// GIL is held.
pub fn set_all(api: &Api, on: bool) -> Result<(), String> {
    let (Some(set_ts), Some(interp_get), Some(head), Some(next)) =
        (api.set_profile_tstate, api.interp_get, api.thread_head, api.thread_next)
    else {
        return Err("this CPython lacks _PyEval_SetProfile or the thread-state iterators".into());
    };
    let func = on.then_some(profile as crate::capi::TraceFunc);
    unsafe {
        let mut ts = head(interp_get());
        while !ts.is_null() {
            if set_ts(ts, func, ptr::null_mut()) != 0 {
                api.clear_error();
            }
            ts = next(ts);
        }
    }
    // threading.setprofile(hook) for threads started later; None to undo.
    let threading =
        api.owned(unsafe { (api.import)(c"threading".as_ptr()) }).ok_or("cannot import threading")?;
    let setprofile = api.attr(threading.ptr, c"setprofile").ok_or("threading.setprofile is missing")?;
    let hook = if on {
        Some(
            api.owned(unsafe { (api.cfunction_new)(&HOOK_DEF, ptr::null_mut(), ptr::null_mut()) })
                .ok_or("cannot create the thread hook")?,
        )
    } else {
        None
    };
    let arg = hook.as_ref().map_or(api.none, |h| h.ptr);
    api.call(setprofile.ptr, &[arg]).ok_or("threading.setprofile failed")?;
    Ok(())
}

/// Whether a Python-level profiler is set in this thread (it would be
/// replaced: 3.11 has one profile function per thread).
pub fn other_profiler(api: &Api) -> bool {
    let Some(sys) = api.owned(unsafe { (api.import)(c"sys".as_ptr()) }) else { return false };
    let Some(get) = api.attr(sys.ptr, c"getprofile") else { return false };
    api.call(get.ptr, &[]).is_some_and(|p| p.ptr != api.none)
}
