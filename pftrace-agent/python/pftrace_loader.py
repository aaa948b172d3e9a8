# pftrace's agent loader, shared by sitecustomize.py (launch mode) and
# pftrace_attach.py (PEP 768). Installed by pftraced: root-owned, read-only.


# Named so no user's name form picks it up by accident: in a process traced
# through USDT (3.9, 3.15) launched by pftraced, its calls fire the probes.
def _pftrace_load(agent_dir, socket):
    """Loads the agent from agent_dir and starts it; never raises."""
    import sys

    if sys.version_info < (3, 11):
        return  # pftraced traces these through their USDT probes, or not at all
    try:
        import sysconfig

        if sysconfig.get_config_var("Py_GIL_DISABLED"):
            raise RuntimeError("free-threaded CPython builds are not supported by the agent")
        sys.path.insert(0, agent_dir)
        try:
            import pftrace_agent
        finally:
            sys.path.remove(agent_dir)
        status = pftrace_agent.start(socket)
        if not status.startswith("tracing") and "not needed" not in status:
            sys.stderr.write("pftrace: %s\n" % status)
    except BaseException as e:  # never into the program
        sys.stderr.write("pftrace: the agent did not load: %r\n" % (e,))
