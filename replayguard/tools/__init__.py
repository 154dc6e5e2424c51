"""Developer tools that ship as commands (``replayguard <command>``): the fake upstream, a scripted client, the
trace viewer, the benchmark, the soak and the mitmdump launcher they share with the tests."""
