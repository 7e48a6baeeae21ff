"""The `selfsup` subcommands, one module each: `add_parser(subparsers)` registers the flags and
`run(args) -> int` turns them into typed options for an engine (selfsup.jobs.training,
selfsup.jobs.evaluation, selfsup.jobs.cluster, selfsup.jobs.bench, selfsup.pipeline). Engines never
see an argparse.Namespace."""
