% rebase('base.tpl', title='Human approval for AI agents')
<h1>PausePoint</h1>
<p>Your agents ask before they act; a person answers by text, email or push; the agent hears back.</p>
<ul class="links">
  <li><a href="/dashboard">Dashboard</a>: your pauses, their timelines, webhooks and keys.</li>
% if registration_open:
  <li><a href="/dashboard/signup">Sign up</a>: your API keys are created for you.</li>
% end
  <li><a href="/v1/openapi.json">API description</a> (OpenAPI 3.1).</li>
</ul>
