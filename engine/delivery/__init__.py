"""Delivery: the outbox to the ESP. Dispatchers, ESP adapters, templates, dead letters.

Public:
  DeliveryConfig, EspConfig, delivery_config_from_mapping   the [delivery] and [[esp]] tables
  TemplateSet, Rendered                                     sandboxed Jinja2 email templates
  build_context                                             what a template sees for one send
"""
