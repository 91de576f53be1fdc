"""Set dotted config fields in tests, as `--config.a.b=value` does on the command line."""


def override(config, overrides):
  """Set each `'a.b.c': value` of `overrides` on `config` (an ml_collections ConfigDict); returns `config`."""
  for key, value in overrides.items():
    node = config
    *path, leaf = key.split(".")
    for p in path:
      node = node[p]
    node[leaf] = value
  return config
