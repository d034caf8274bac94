"""`picogpt serve`: OpenAI's API over one `Model` (openai_api.py: requests to Model calls to
response shapes, with fields.py checking each request field), the HTTP transport apart
(transport.py: the standard library's server, its safety rules, streaming), and the page
(page/)."""
