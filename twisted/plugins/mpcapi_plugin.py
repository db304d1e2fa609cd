from twisted.application.service import ServiceMaker

mpcapi = ServiceMaker("mpcapi", "mpcapi.tap", "OpenAI-compatible gateway to LiteLLM", "mpcapi")
