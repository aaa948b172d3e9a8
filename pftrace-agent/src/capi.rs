//! The one place that knows CPython's C API and its version differences.
//!
//! The agent is one shared object for CPython 3.11 to 3.15+, so it links
//! against no Python symbol: Python dlopens extensions with RTLD_NOW, and a
//! single undefined 3.12-only symbol would make the import fail on 3.11.
//! Every function is looked up once with `dlsym(RTLD_DEFAULT)` (it finds
//! the interpreter's symbols whether libpython is linked statically, as in
//! Debian and pyenv, or shared, as in Fedora), with the old private name as a
//! fallback where 3.12 renamed a function (`_PyCode_GetExtra` became
//! `PyUnstable_Code_GetExtra`).
//!
//! Only layouts that are the same in every supported version are used: the
//! object header (reference count, type) of GIL builds, `PyMethodDef` and
//! `PyModuleDef`. Free-threaded builds (another object header) are refused
//! by the loader script before the import.

use std::ffi::{CStr, c_char, c_int, c_long, c_void};

/// An opaque Python object (GIL builds: `ob_refcnt`, `ob_type`).
#[repr(C)]
pub struct PyObject {
    pub ob_refcnt: isize,
    pub ob_type: *mut c_void,
}

pub type Obj = *mut PyObject;

/// `PyCFunction` with METH_FASTCALL: (self, args, nargs).
pub type FastCall = unsafe extern "C" fn(Obj, *const Obj, isize) -> Obj;
/// `PyCFunction` with METH_VARARGS / METH_NOARGS / METH_O: (self, arg).
pub type PlainCall = unsafe extern "C" fn(Obj, Obj) -> Obj;
/// `Py_tracefunc`: (obj, frame, what, arg) -> 0 or -1.
pub type TraceFunc = unsafe extern "C" fn(Obj, Obj, c_int, Obj) -> c_int;
/// `freefunc` of a code extra slot.
pub type FreeFunc = unsafe extern "C" fn(*mut c_void);

pub const METH_O: c_int = 0x0008;
pub const METH_NOARGS: c_int = 0x0004;
pub const METH_FASTCALL: c_int = 0x0080;

/// `PyTrace_*` values of a profile function's `what`.
pub const PYTRACE_CALL: c_int = 0;
pub const PYTRACE_RETURN: c_int = 3;

#[repr(C)]
pub struct PyMethodDef {
    pub ml_name: *const c_char,
    pub ml_meth: *const c_void,
    pub ml_flags: c_int,
    pub ml_doc: *const c_char,
}
// SAFETY: static, never mutated after construction; Python only reads it.
unsafe impl Sync for PyMethodDef {}

#[repr(C)]
pub struct PyModuleDefBase {
    pub ob_base: PyObject,
    pub m_init: *const c_void,
    pub m_index: isize,
    pub m_copy: Obj,
}

#[repr(C)]
pub struct PyModuleDef {
    pub m_base: PyModuleDefBase,
    pub m_name: *const c_char,
    pub m_doc: *const c_char,
    pub m_size: isize,
    pub m_methods: *const PyMethodDef,
    pub m_slots: *const c_void,
    pub m_traverse: *const c_void,
    pub m_clear: *const c_void,
    pub m_free: *const c_void,
}

/// `PYTHON_API_VERSION`, unchanged since 3.0 (what PyModule_Create passes).
pub const PYTHON_API_VERSION: c_int = 1013;

macro_rules! api {
    ($( $field:ident : fn($($arg:ty),*) $(-> $ret:ty)? = [$($sym:literal),+] ),* $(,)?) => {
        /// The C API functions the agent calls, resolved at import.
        pub struct Api {
            $( pub $field: unsafe extern "C" fn($($arg),*) $(-> $ret)?, )*
            /// `PyEval_SetProfile` family, 3.11 only (the profile hook).
            pub set_profile_tstate: Option<unsafe extern "C" fn(*mut c_void, Option<TraceFunc>, Obj) -> c_int>,
            pub frame_get_code: Option<unsafe extern "C" fn(Obj) -> Obj>,
            pub interp_get: Option<unsafe extern "C" fn() -> *mut c_void>,
            pub thread_head: Option<unsafe extern "C" fn(*mut c_void) -> *mut c_void>,
            pub thread_next: Option<unsafe extern "C" fn(*mut c_void) -> *mut c_void>,
            pub set_profile: Option<unsafe extern "C" fn(Option<TraceFunc>, Obj)>,
            /// `Py_None`, the object.
            pub none: Obj,
            /// `Py_Version` (e.g. 0x030C01F0 for 3.12.1).
            pub version: u32,
        }

        impl Api {
            /// Resolves every symbol; the name of the first one missing otherwise.
            ///
            /// # Safety
            /// Must run inside a CPython process.
            pub unsafe fn resolve() -> Result<Self, String> {
                unsafe {
                    let version = match sym(&[c"Py_Version"]) {
                        Some(p) => *(p as *const u32),
                        None => return Err("Py_Version (CPython 3.11 or later is needed)".into()),
                    };
                    let none = sym(&[c"_Py_NoneStruct"]).ok_or("_Py_NoneStruct")? as Obj;
                    Ok(Self {
                        $( $field: {
                            let p = sym(&[$($sym),+]).ok_or(stringify!($field))?;
                            std::mem::transmute::<*mut c_void, unsafe extern "C" fn($($arg),*) $(-> $ret)?>(p)
                        }, )*
                        set_profile_tstate: sym(&[c"_PyEval_SetProfile"]).map(|p| std::mem::transmute(p)),
                        frame_get_code: sym(&[c"PyFrame_GetCode"]).map(|p| std::mem::transmute(p)),
                        interp_get: sym(&[c"PyInterpreterState_Get"]).map(|p| std::mem::transmute(p)),
                        thread_head: sym(&[c"PyInterpreterState_ThreadHead"]).map(|p| std::mem::transmute(p)),
                        thread_next: sym(&[c"PyThreadState_Next"]).map(|p| std::mem::transmute(p)),
                        set_profile: sym(&[c"PyEval_SetProfile"]).map(|p| std::mem::transmute(p)),
                        none,
                        version,
                    })
                }
            }
        }
    };
}

api! {
    inc_ref: fn(Obj) = [c"Py_IncRef"],
    dec_ref: fn(Obj) = [c"Py_DecRef"],
    import: fn(*const c_char) -> Obj = [c"PyImport_ImportModule"],
    get_attr: fn(Obj, *const c_char) -> Obj = [c"PyObject_GetAttrString"],
    call_object: fn(Obj, Obj) -> Obj = [c"PyObject_CallObject"],
    call_kw: fn(Obj, Obj, Obj) -> Obj = [c"PyObject_Call"],
    dict_new: fn() -> Obj = [c"PyDict_New"],
    dict_set_item_string: fn(Obj, *const c_char, Obj) -> c_int = [c"PyDict_SetItemString"],
    tuple_new: fn(isize) -> Obj = [c"PyTuple_New"],
    tuple_set_item: fn(Obj, isize, Obj) -> c_int = [c"PyTuple_SetItem"],
    long_from: fn(c_long) -> Obj = [c"PyLong_FromLong"],
    long_as: fn(Obj) -> c_long = [c"PyLong_AsLong"],
    unicode_from: fn(*const c_char) -> Obj = [c"PyUnicode_FromString"],
    unicode_utf8: fn(Obj, *mut isize) -> *const c_char = [c"PyUnicode_AsUTF8AndSize"],
    err_occurred: fn() -> Obj = [c"PyErr_Occurred"],
    err_clear: fn() = [c"PyErr_Clear"],
    cfunction_new: fn(*const PyMethodDef, Obj, Obj) -> Obj = [c"PyCFunction_NewEx"],
    module_create: fn(*mut PyModuleDef, c_int) -> Obj = [c"PyModule_Create2"],
    gil_ensure: fn() -> c_int = [c"PyGILState_Ensure"],
    save_thread: fn() -> *mut c_void = [c"PyEval_SaveThread"],
    restore_thread: fn(*mut c_void) = [c"PyEval_RestoreThread"],
    gil_release: fn(c_int) = [c"PyGILState_Release"],
    is_finalizing: fn() -> c_int = [c"Py_IsFinalizing", c"_Py_IsFinalizing"],
    eval_get_globals: fn() -> Obj = [c"PyEval_GetGlobals"],
    dict_get_item_string: fn(Obj, *const c_char) -> Obj = [c"PyDict_GetItemString"],
    request_extra_index: fn(Option<FreeFunc>) -> isize =
        [c"PyUnstable_Eval_RequestCodeExtraIndex", c"_PyEval_RequestCodeExtraIndex"],
    code_get_extra: fn(Obj, isize, *mut *mut c_void) -> c_int =
        [c"PyUnstable_Code_GetExtra", c"_PyCode_GetExtra"],
    code_set_extra: fn(Obj, isize, *mut c_void) -> c_int =
        [c"PyUnstable_Code_SetExtra", c"_PyCode_SetExtra"],
}

// SAFETY: function pointers and the address of the static None object, which
// is only used with the GIL held.
unsafe impl Send for Api {}
unsafe impl Sync for Api {}

/// The first of `names` the process defines.
fn sym(names: &[&CStr]) -> Option<*mut c_void> {
    names.iter().find_map(|name| {
        // SAFETY: dlsym with a NUL-terminated name.
        let p = unsafe { libc::dlsym(libc::RTLD_DEFAULT, name.as_ptr()) };
        (!p.is_null()).then_some(p)
    })
}

impl Api {
    /// (major, minor) of the running interpreter.
    pub fn minor(&self) -> (u32, u32) {
        (self.version >> 24, (self.version >> 16) & 0xff)
    }

    /// Whether sys.monitoring exists (3.12+); otherwise the profile hook.
    pub fn has_monitoring(&self) -> bool {
        self.minor() >= (3, 12)
    }

    /// A new reference to None.
    pub fn none(&self) -> Obj {
        unsafe { (self.inc_ref)(self.none) };
        self.none
    }

    /// Clears a pending exception, if any: the agent never raises into the process.
    pub fn clear_error(&self) {
        unsafe {
            if !(self.err_occurred)().is_null() {
                (self.err_clear)();
            }
        }
    }

    /// `obj.name` as a new reference, or None (error cleared).
    pub fn attr(&self, obj: Obj, name: &CStr) -> Option<Owned<'_>> {
        let p = unsafe { (self.get_attr)(obj, name.as_ptr()) };
        self.owned(p)
    }

    /// Wraps a new reference; None (error cleared) for NULL.
    pub fn owned(&self, p: Obj) -> Option<Owned<'_>> {
        if p.is_null() {
            self.clear_error();
            None
        } else {
            Some(Owned { api: self, ptr: p })
        }
    }

    /// The UTF-8 text of a str object (borrowed from it).
    pub fn text<'a>(&self, s: &'a Owned<'_>) -> Option<&'a [u8]> {
        let mut len: isize = 0;
        let p = unsafe { (self.unicode_utf8)(s.ptr, &mut len) };
        if p.is_null() {
            self.clear_error();
            return None;
        }
        Some(unsafe { std::slice::from_raw_parts(p as *const u8, len.max(0) as usize) })
    }

    /// Calls `callable(*args)` (args are borrowed); the result as a new reference.
    pub fn call(&self, callable: Obj, args: &[Obj]) -> Option<Owned<'_>> {
        unsafe {
            let tuple = self.owned((self.tuple_new)(args.len() as isize))?;
            for (i, &a) in args.iter().enumerate() {
                (self.inc_ref)(a);
                // Steals the reference.
                (self.tuple_set_item)(tuple.ptr, i as isize, a);
            }
            self.owned((self.call_object)(callable, tuple.ptr))
        }
    }

    /// A new int object.
    pub fn int(&self, v: i64) -> Option<Owned<'_>> {
        self.owned(unsafe { (self.long_from)(v as c_long) })
    }

    /// The value of an int object (-1 and the error cleared on failure).
    pub fn as_int(&self, o: Obj) -> i64 {
        let v = unsafe { (self.long_as)(o) };
        if v == -1 {
            self.clear_error();
        }
        v
    }
}

/// A strong reference, released on drop (with the GIL held: these never leave
/// the thread that holds it).
pub struct Owned<'a> {
    api: &'a Api,
    pub ptr: Obj,
}

impl Owned<'_> {
    /// Gives up ownership without releasing the reference.
    pub fn into_raw(self) -> Obj {
        let p = self.ptr;
        std::mem::forget(self);
        p
    }
}

impl Drop for Owned<'_> {
    fn drop(&mut self) {
        unsafe { (self.api.dec_ref)(self.ptr) };
    }
}
