.PHONY: demo test openapi bench
demo:  ## set up, then patch the built-in model through the real service
	bash scripts/demo.sh
test:  ## set up, then run the whole test suite against a throwaway Redis
	bash scripts/test.sh
openapi:  ## regenerate openapi.yaml from the app
	.venv/bin/litestar --app hoppatch.service.app:create_app schema openapi --output openapi.yaml
