"""The OpenAI-compatible HTTP server: `app.build_app(llm, ...)`, request models in `protocol`, the
endpoints' work in `serving`, Prometheus text in `metrics`, and `shoal serve` in `cli`.

Nothing here is imported by `import shoal`; FastAPI and uvicorn load only when a server is built.
"""
