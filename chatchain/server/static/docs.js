// Starts Swagger UI on /docs (docs.html). A file of its own: the page's Content-Security-Policy
// runs no inline script. Every URL is relative to the page, so a path prefix (a reverse proxy)
// is kept.
"use strict";

window.ui = SwaggerUIBundle({
  url: new URL("openapi.json", document.baseURI).href,
  dom_id: "#swagger-ui",
  layout: "BaseLayout",
  deepLinking: true,
  showExtensions: true,
  showCommonExtensions: true,
  // Swagger UI would send the API description to swagger.io's validator for its badge.
  validatorUrl: null,
  presets: [SwaggerUIBundle.presets.apis, SwaggerUIBundle.SwaggerUIStandalonePreset],
});
