% rebase('dashboard.tpl', title='Your keys', here='keys')
<h1>{{'Your API key' if len(keys) == 1 else 'Your API keys'}}</h1>
<p class="error" role="alert"><strong>Copy {{'it' if len(keys) == 1 else 'them'}} now: you will not see {{'it' if len(keys) == 1 else 'these'}} again.</strong>
Only a digest is stored; if you lose a key, rotate it.</p>
% for n, (label, key) in enumerate(keys):
<div class="key">
  <label for="key-{{n}}">{{label}}</label>
  <input id="key-{{n}}" class="secret" readonly value="{{key}}">
  <button type="button" class="copy secondary" data-copy="key-{{n}}" hidden>Copy</button>
</div>
% end
<p>Try it: <code>curl -H "Authorization: Bearer pp_test_…" {{get('base', '')}}/v1/pause</code>. Test keys never send anything.</p>
<p><a href="/dashboard/overview">Go to the dashboard</a></p>
