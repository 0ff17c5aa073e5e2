"""Persona files the tests share: one service persona with per-call variables."""

OMAR = """\
kind: service
numbers: ["2040"]
browser: true          # browser calls reach it too (the context tests call it from a page)
company: CitySan Services
business: waste management
agent_name: Ayelen Lucero
variables:              # name: default ("" = unknown)
  customer_name: ""
  next_pickup: ""
information:
  - "Verify customer name {customer_name}."
  - "Upcoming pickup: {next_pickup}."
  - "Compost bin service available for $8/month add-on."
voice: NATF2
"""
