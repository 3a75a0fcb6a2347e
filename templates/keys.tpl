% rebase('dashboard.tpl', title='Keys', here='keys')
<h1>API keys</h1>
% if error:
<p class="error" role="alert">{{error}}</p>
% end
<dl class="facts">
  <dt>Live key</dt><dd><code id="live-hint">{{hints.get(1, 'none')}}</code></dd>
  <dt>Test key</dt><dd><code id="test-hint">{{hints.get(0, 'none')}}</code></dd>
</dl>
<h2>Rotate a key</h2>
<p>The old key stops working at once; the new one is shown once.</p>
<form method="post" action="/dashboard/keys/rotate" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label for="key">Key</label>
  <select id="key" name="key"><option value="test">test</option><option value="live">live</option></select>
  <label for="rotate-password">Your password</label>
  <input id="rotate-password" name="password" type="password" autocomplete="current-password" required>
  <button type="submit" class="danger">Rotate</button>
</form>
<h2>Change your password</h2>
<p>Every sign-in ends, this one too.</p>
<form method="post" action="/dashboard/password" class="stack">
  <input type="hidden" name="csrf" value="{{csrf}}">
  <label for="current-password">Current password</label>
  <input id="current-password" name="password" type="password" autocomplete="current-password" required>
  <label for="new-password">New password (at least 8 characters)</label>
  <input id="new-password" name="new_password" type="password" autocomplete="new-password" required minlength="8">
  <button type="submit">Change password</button>
</form>
