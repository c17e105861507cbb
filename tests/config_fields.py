"""One helper the tests share: setting dotted config fields, as `--config.a.b=v` would."""


def set_fields(config, fields: dict):
  """Sets each "section.name" of `fields` on the (unlocked) `config`; returns the config."""
  for key, value in fields.items():
    *sections, name = key.split(".")
    target = config
    for section in sections:
      target = target[section]
    target[name] = value
  return config
